"""The local web page (Gradio, optional extra): drop ultrasound images, see class, probabilities and Grad-CAM."""
from __future__ import annotations

import html
import json
import os
import threading
from pathlib import Path

from .errors import BusiError
from .operating import describe
from .inference import LoadedModel, image_files

MAX_IMAGES = 12  # per request
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"  # in a source checkout; an installed wheel has none
MAX_FILE_SIZE = "20mb"
DISCLAIMER = "Research tool, not a diagnosis. Do not use it to make clinical decisions."
OUTSIDE = ("Unlike the images this model trained on (another scanner or setting?): its answer is less reliable here "
           "than its figures say.")


class Predictor:
    """A loaded checkpoint plus what the page says about it; one lock, because Grad-CAM hooks the model."""

    def __init__(self, checkpoint_path: str | Path):
        self.path = Path(checkpoint_path)
        self.loaded = LoadedModel(self.path)
        self.model, self.config, self.extras = self.loaded.model, self.loaded.config, self.loaded.extras
        self.classes = self.loaded.classes
        self.lock = threading.Lock()
        self.card = model_card(self.path, self.config)

    def classify(self, path: str | Path, explain: bool = True) -> dict:
        """{'file', 'predicted', 'probabilities', 'lesion' …} (+ 'overlay' array), or {'file', 'error'} for a bad file:
        the rows `busi predict` writes (LoadedModel.describe)."""
        name = Path(path).name
        try:
            if Path(path).stat().st_size == 0:
                raise BusiError(f"{name}: empty file")
            prepared = self.loaded.prepare(path)
        except BusiError as e:  # the file is named once, beside the message, not inside it too
            return {"file": name, "error": str(e).removeprefix(f"{path}: ").removeprefix(f"{name}: ")}
        with self.lock:
            row = self.loaded.describe([prepared], explain=explain)[0]
        return {"file": name, **{k: v for k, v in row.items() if k != "path"}}


class Uploads:
    """What browsers uploaded, deleted once answered: a DICOM upload is patient data, and Gradio would keep it in its
    upload folder after the server stops. Gradio files identical uploads under one path, so twenty requests for the
    same scan share a file: it is deleted when no request is in flight any more. Only files inside Gradio's upload
    folder are touched (never the examples)."""

    def __init__(self):
        self.lock, self.in_flight, self.answered = threading.Lock(), 0, set()

    def __enter__(self):
        with self.lock:
            self.in_flight += 1
        return self

    def answered_with(self, files) -> None:
        with self.lock:
            self.answered.update(str(getattr(f, "name", f)) for f in files or [])

    def __exit__(self, *exc):
        with self.lock:
            self.in_flight -= 1
            if self.in_flight == 0:
                forget_uploads(self.answered)
                self.answered.clear()


def forget_uploads(files) -> None:
    """Delete these uploads (the files inside Gradio's upload folder, and their folders once empty)."""
    from gradio.utils import get_upload_folder
    uploads = Path(get_upload_folder()).resolve()
    for f in files or []:
        path = Path(getattr(f, "name", f)).resolve()
        if path.is_file() and path.is_relative_to(uploads):
            path.unlink(missing_ok=True)
            if path.parent != uploads and not any(path.parent.iterdir()):
                path.parent.rmdir()  # Gradio keeps each upload in a folder of its own


def model_card(path: Path, config: dict) -> dict:
    """Name, date, classes and the metrics measured when it was trained (from its run folder or the bundled card)."""
    card = {"model": config["arch"], "trained_at": config.get("trained_at", "unknown"), "classes": config["classes"],
            "image_size": config["image_size"], "temperature": round(float(config.get("temperature", 1.0)), 3),
            "decision": describe(config.get("operating_point"))}
    metrics = path.parent / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        at_rule = m.get("operating_point") or {}
        if at_rule.get("accuracy") is not None:  # what users get: the stored rule's decisions, not the argmax's
            card["evaluation"] = (f"held-out test part of {m['n']} images, at its decision rule: accuracy "
                                  f"{at_rule['accuracy']:.3f}, malignant recall "
                                  f"{at_rule['per_class'].get('malignant', {}).get('recall') or float('nan'):.3f}")
        else:
            card["evaluation"] = (f"held-out test part of {m['n']} images (most probable class): accuracy "
                                  f"{m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}, malignant recall "
                                  f"{m['per_class'].get('malignant', {}).get('recall', float('nan')):.3f}")
    bundled = path.parent / "card.json"
    if bundled.is_file():  # the home figure never alone: the hospital-out one comes first
        found = json.loads(bundled.read_text())
        for key in ("hospitals_never_seen", "cross_validation"):
            if found.get(key):
                card[key] = found[key]
    cv = path.parent.parent / "cv_metrics.json"
    if cv.is_file():
        s = json.loads(cv.read_text()).get(config["arch"])
        if s:
            a = s["metrics"]["accuracy"]
            card["cross_validation"] = (f"accuracy (most probable class) {a['estimate']:.3f} (95% CI "
                                        f"{a['ci_low']:.3f}–{a['ci_high']:.3f})")
    return card


def _bars(result: dict) -> str:
    if "error" in result:
        return f'<div class="busi-card busi-error"><b>{html.escape(result["file"])}</b>: {html.escape(result["error"])}</div>'
    rows = "".join(
        f'<div class="busi-bar"><span>{html.escape(c)}</span><div><i style="width:{100 * p:.1f}%"></i></div><b>{p:.1%}</b></div>'
        for c, p in sorted(result["probabilities"].items(), key=lambda kv: -kv[1]))
    shifted = (f'<div class="busi-note">{OUTSIDE}</div>' if result.get("outside_training") else "")
    return (f'<div class="busi-card"><div><b>{html.escape(result["file"])}</b> → '
            f'<span class="busi-class">{html.escape(result["predicted"])}</span></div>'
            f'<div class="busi-note">{html.escape(result["basis"]["text"])}</div>{rows}'
            f'{_lesion_line(result.get("lesion"))}{shifted}'
            f'<div class="busi-note">{DISCLAIMER}</div></div>')


def _lesion_line(lesion: dict | None) -> str:
    """The outline's measurements in words (the overlay draws it)."""
    if not lesion:
        return ""
    if not lesion.get("box"):
        return f'<div class="busi-lesion">No lesion outlined (lesion score {lesion["score"]:.2f}).</div>'
    ratio = lesion["depth_to_width"]
    sign = " — taller than wide" if ratio and ratio > 1 else ""
    size = (f'{lesion["width_mm"]:.1f} × {lesion["depth_mm"]:.1f} mm' if "width_mm" in lesion
            else f'{lesion["width_px"]} × {lesion["depth_px"]} pixels')
    return (f'<div class="busi-lesion">Lesion outlined (score {lesion["score"]:.2f}): {size} (width × depth), '
            f'depth-to-width {ratio:.2f}{sign}.</div>')


CSS = """
.busi-card{border:1px solid #ddd;border-radius:6px;padding:.6em .9em;margin:.5em 0}
.busi-error{border-color:#d33;background:#fff0f0}
.busi-class{font-weight:700;font-size:1.15em}
.busi-bar{display:grid;grid-template-columns:7em 1fr 4em;align-items:center;gap:.5em;margin:.2em 0}
.busi-bar div{background:#eee;height:.9em;border-radius:3px}.busi-bar i{display:block;height:100%;background:#3b82f6;border-radius:3px}
.busi-note{color:#8a5a00;font-size:.85em;margin-top:.4em}
.busi-lesion{font-size:.9em;margin-top:.4em}
"""


def build_app(predictor: Predictor, examples: Path = EXAMPLES):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    card = predictor.card
    about = [f"**Model** {card['model']} · trained {card['trained_at']} · classes {', '.join(card['classes'])} · "
             f"input {card['image_size']}×{card['image_size']}"]
    for key, label in (("hospitals_never_seen", "At a hospital it never saw"), ("cross_validation", "Cross-validation"),
                       ("evaluation", "Test")):
        if key in card:
            about.append(f"**{label}:** {card[key]}")
    about.append(f"**Decision:** {card['decision']}")
    if len(about) == 2:
        about.append("No evaluation found beside this checkpoint: treat its answers with extra care.")

    uploads = Uploads()

    def analyse(files):
        files = files or []
        if not files:
            return '<div class="busi-card busi-error">Choose one or more ultrasound images first.</div>', []
        if len(files) > MAX_IMAGES:
            return (f'<div class="busi-card busi-error">Too many images ({len(files)}): at most {MAX_IMAGES} per request.</div>',
                    [])
        with uploads:
            uploads.answered_with(files)
            results = [predictor.classify(f) for f in files]
        gallery = [(r["overlay"], f"{r['file']}: {r['basis']['text']}") for r in results if "overlay" in r]
        return "".join(_bars(r) for r in results), gallery

    def classify_api(file):
        """JSON for programs: the same answer as the page, without the picture."""
        if not file:
            return {"error": "no file"}
        with uploads:
            uploads.answered_with([file])
            result = predictor.classify(file, explain=False)
        return {**result, "note": DISCLAIMER + (" " + OUTSIDE if result.get("outside_training") else "")}

    theme = gr.themes.Base(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])  # no web fonts
    # what the page drew (overlays of patients' scans) is deleted after 10 minutes, and all of it when the server stops
    with gr.Blocks(analytics_enabled=False, title="busi — breast ultrasound classifier", delete_cache=(60, 600)) as app:
        gr.Markdown(f"# Breast ultrasound: normal, benign or malignant?\n⚠️ **{DISCLAIMER}**")
        gr.Markdown("\n\n".join(about))
        with gr.Row():
            with gr.Column(scale=1):
                # no file_types filter: the browser would drop other files without a word; the server answers them
                files = gr.File(label=f"Ultrasound images: PNG, JPEG, BMP, TIFF or DICOM, up to {MAX_IMAGES} at once",
                                file_count="multiple", type="filepath")
                button = gr.Button("Analyse", variant="primary")
                example_files = [str(p) for p in image_files([examples])][:MAX_IMAGES] if examples.is_dir() else []
                # a fresh clone can try the page with no data of its own
                try_examples = (gr.Button(f"Try the {len(example_files)} example images (BUSI, from examples/)")
                                if example_files else None)
            with gr.Column(scale=2):
                answer = gr.HTML(label="Result")
                overlays = gr.Gallery(label="Where the model looked (Grad-CAM) and the lesion it outlined (white)", columns=3, height="auto")
        button.click(analyse, files, [answer, overlays], api_name="analyse")
        if try_examples is not None:
            try_examples.click(lambda: analyse(example_files), None, [answer, overlays], api_name=False)
        api_in = gr.File(visible=False, type="filepath")
        api_out = gr.JSON(visible=False)
        gr.Button(visible=False).click(classify_api, api_in, api_out, api_name="classify")
    return app, theme


def serve(checkpoint_path: str | Path, host: str = "127.0.0.1", port: int = 7860) -> None:
    predictor = Predictor(checkpoint_path)
    app, theme = build_app(predictor)
    print(f"busi: serving {predictor.path} on http://{host}:{port} (this machine only unless --host says otherwise; "
          "Ctrl+C stops it)", flush=True)
    # quiet: Gradio's own banner offers share=True (a public tunnel), which busi never opens
    app.queue(default_concurrency_limit=4).launch(server_name=host, server_port=port, max_file_size=MAX_FILE_SIZE,
                                                   share=False, inbrowser=False, show_error=True, theme=theme, css=CSS,
                                                   footer_links=["api"], pwa=False, ssr_mode=False, quiet=True)
