"""report.html: one self-contained page (images embedded) built only from a run folder's files."""
from __future__ import annotations

import base64
import csv
import html
import json
from datetime import datetime
from pathlib import Path

import yaml

from . import __version__
from .errors import BusiError

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee;margin:.3em 0}.note{background:#fff6d6;padding:.6em 1em;border-radius:4px}
.wide{overflow-x:auto}.lead{background:#eef5ff;padding:.4em 1em;border-radius:4px}pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em}.muted{color:#666;font-size:.9em}
"""


CV_ONLY = ("folds", "repeats", "external", "external_meta", "external_id_column", "external_patient_column",
           "external_group_column")
NOT_USED_BY = {"train": CV_ONLY, "cv": ("test_size",)}


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption class="muted">{html.escape(alt)}</figcaption></figure>'


def _fmt(v) -> str:
    """Three decimals for a figure, a dash for a missing one: never a raw None or six digits."""
    if v is None:
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _table(header: list[str], rows: list[list], cls: str = "") -> str:
    def cell(v):
        return html.escape(_fmt(v))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f'<div class="wide"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _model_section(folder: Path, name: str) -> str:
    m = _json(folder / "metrics.json")
    if m is None:
        return ""
    parts = [f"<h2>{html.escape(name)}</h2>"]
    if m.get("command") == "evaluate":
        parts.append('<div class="lead">' + "".join(f"<p>{html.escape(line)}</p>" for line in lead(m, m.get("data")))
                     + "</div>")
    parts.append('<p class="muted">The first two tables score the most probable class, which compares models; what '
                 "users get is the decision rule's answer, in the table after them and in the confusion matrix.</p>")
    parts.append(_table(["metric (most probable class)", "value"], [["images", m["n"]], ["accuracy", m["accuracy"]],
                                              ["macro precision", m["macro_precision"]], ["macro recall", m["macro_recall"]],
                                              ["macro F1", m["macro_f1"]], ["macro AUROC", m["auroc"]],
                                              ["always-majority baseline", m.get("majority_baseline")]], "metrics"))
    def few(value, support):  # a figure of a class with fewer than TOO_FEW images says little
        return value if support >= TOO_FEW or value is None else f"{_fmt(value)} (too few: {support})"
    parts.append(_table(["class", "precision", "recall", "F1", "AUROC", "images"],
                        [[c, few(v["precision"], v["support"]), few(v["recall"], v["support"]), few(v["f1"], v["support"]),
                          few(v.get("auroc"), v["support"]), v["support"]] for c, v in m["per_class"].items()],
                        "metrics"))
    if m.get("per_source"):
        parts.append(_per_source(m["per_source"]))
    if m.get("absent_classes"):
        parts.append(f'<p class="note">No {", ".join(map(html.escape, m["absent_classes"]))} images in this folder: '
                     f"macro averages are over the classes present, and the macro AUROC is not defined.</p>")
    if m.get("operating_point"):
        op = m["operating_point"]
        parts.append(_table(["at the decision rule (what users get)", "value"],
                            [["rule", op["rule"]], ["accuracy", op["accuracy"]]]
                            + [[f"{c} recall / precision", f"{_fmt(v['recall'])} / {_fmt(v['precision'])}"]
                               for c, v in op["per_class"].items()], "metrics"))
    mvb = m.get("malignant_vs_benign")
    if mvb:
        parts.append(_binary_table("Malignant vs benign", mvb))
        for group, g in (m.get("per_group") or {}).items():
            if g.get("malignant_vs_benign"):
                parts.append(_binary_table(f"{m.get('group_column', 'group')} = {group} (n={g['n']})", g["malignant_vs_benign"]))
    overlap = m.get("training_overlap")
    if overlap and overlap.get("checked") and overlap["n_with_near_duplicate_in_training"]:
        rest = overlap.get("metrics_without_them")
        without = (f"without them (n={rest['n']}): accuracy {rest['accuracy']:.3f}, macro-F1 {rest['macro_f1']:.3f}"
                   if rest else "no image is left without one")
        parts.append(f'<p class="note">{overlap["n_with_near_duplicate_in_training"]} of these {m["n"]} images are '
                     f"near-duplicates of images the model trained on; {without}.</p>")
    cal = m.get("calibration")
    if cal and cal["ece_before"] == cal["ece_after"]:  # no temperature: two equal columns say nothing
        parts.append(f'<p class="muted">Calibration: ECE {_fmt(cal["ece_before"])} (15 bins), NLL {_fmt(cal["nll_before"])}; '
                     f'{html.escape(cal["note"])}.</p>')
    elif cal:
        parts.append(_table(["calibration", "before", "after"],
                            [["ECE (15 bins)", cal["ece_before"], cal["ece_after"]], ["NLL", cal["nll_before"], cal["nll_after"]]])
                     + f'<p class="muted">temperature {cal["temperature"]}; {html.escape(cal["note"])}</p>')
    if m.get("lesion"):
        parts.append(_lesion(m["lesion"]))
    loc = m.get("localization")
    if loc and "per_class" in loc:
        parts.append(_localization(loc))
    for png, alt in (("confusion_matrix.png", "confusion matrix (counts and share of true class)"), ("roc.png", "ROC curves"),
                     ("calibration.png", "reliability diagram"),
                     ("misclassified.png", "misclassified images, most confident first"),
                     ("lesions.png", "lesion outlines: the model's (white), the expert's (green)"),
                     ("gradcam.png", "Grad-CAM overlays (green: right, red: wrong)")):
        parts.append(_img(folder / png, f"{name}: {alt}"))
    return "\n".join(parts)


TOO_FEW = 10  # a class with fewer images than this: its figures are marked, not trusted


def lead(m: dict, data: str | None = None) -> list[str]:
    """The few sentences a user decides on, before any table: what was scored, by which rule, what it found, whether
    the images are like the model's training images and what to do if not, and copies of training images."""
    classes = list(m["per_class"])
    counts = {c: m["per_class"][c]["support"] for c in classes if m["per_class"][c]["support"]}
    said = [f"{m['n']} images{f' of {data}' if data else ''} ("
            + ", ".join(f"{n} {c}" for c, n in counts.items()) + ")."]
    op = m.get("operating_point")
    if op:
        said.append(f"Decision rule: {op['rule'].rstrip('.')}.")
        confusion = op["confusion_matrix"]
        if "malignant" in counts:
            k = classes.index("malignant")
            said.append(f"At this rule it found {confusion[k][k]} of the {counts['malignant']} malignant images "
                        f"(sensitivity {op['per_class']['malignant']['recall']:.0%})" + (
                            f" and called {confusion[classes.index('benign')][k]} of the {counts['benign']} benign ones "
                            f"malignant (specificity {1 - confusion[classes.index('benign')][k] / counts['benign']:.0%})"
                            if "benign" in counts else "") + ".")
        if "normal" in counts:
            said.append(f"It called {op['per_class']['normal']['recall']:.0%} of the {counts['normal']} normal scans "
                        f"normal; accuracy over all three classes {op['accuracy']:.0%}.")
    else:
        said.append(f"The model stores no decision rule: each image gets its most probable class (accuracy "
                    f"{m['accuracy']:.0%}).")
    few = [f"{n} {c}" for c, n in counts.items() if n < TOO_FEW]
    if few:
        said.append(f"Too few to trust: {', '.join(few)} image(s); figures of {'that class' if len(few) == 1 else 'those classes'} "
                    f"are marked (fewer than {TOO_FEW}).")
    shift_verdict = m.get("shift") or {}
    if "outside" in shift_verdict:
        share = f"{shift_verdict['flagged']} of {shift_verdict['n']} images ({shift_verdict['share']:.0%})"
        if shift_verdict["outside"]:
            where = m.get("rule_fitted_where") or ""
            todo = (f"its thresholds were already re-set on {where}: if these images come from there, fine-tuning on "
                    "labelled images of this hospital (busi finetune) is what is left" if where.startswith("images of")
                    else "re-set its thresholds on labelled images of this hospital (busi calibrate), or adapt it "
                         "(busi adapt)")
            said.append(f"{share} lie outside what the model trained on (about {shift_verdict['expected_share']:.0%} "
                        f"would for images like its training images): expect its figures here to be worse than where "
                        f"it was validated; {todo}.")
        elif shift_verdict.get("too_few"):  # 1 of 4 flagged is no evidence either way
            said.append(f"{share} flagged as unlike its training images: too few images to say whether they lie "
                        "outside what the model trained on.")
        else:
            said.append(f"The images look like its training images ({share} flagged; about "
                        f"{shift_verdict['expected_share']:.0%} expected).")
    overlap = m.get("training_overlap") or {}
    if overlap.get("checked"):
        k = overlap["n_with_near_duplicate_in_training"]
        rest = overlap.get("metrics_without_them")
        said.append(f"{k} image(s) are copies or near-copies of images the model trained on"
                    + (f"; without them accuracy is {rest['accuracy']:.0%} (most probable class)" if k and rest else "")
                    + "." if k else f"None is a copy of the model's {overlap['n_training_images']} training images.")
    elif overlap:
        said.append(f"Not checked for copies of its training images: {overlap['note']}.")
    lesion = m.get("lesion") or {}
    if "dice_mean" in lesion:
        said.append(f"Its lesion outlines overlap the experts' masks with a mean Dice of {lesion['dice_mean']:.2f} "
                    f"({lesion['n_lesion_masks']} lesion images).")
    return said


def _lesion(lesion: dict) -> str:
    """The segmenter's figures: Dice against the experts' masks, lesions found, normal scans left without one."""
    rows = []
    if "dice_mean" in lesion:
        ci = lesion.get("dice_ci")
        rows += [["Dice, mean over lesion images", f"{lesion['dice_mean']:.3f}"
                  + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")],
                 ["Dice, median", lesion["dice_median"]], ["IoU, mean", lesion["iou_mean"]],
                 ["lesion masks compared", lesion["n_lesion_masks"]]]
    rows += [[label, lesion[key]] for key, label in (("lesions_found", "lesions found"),
                                                     ("normal_scans_without_lesion", "normal scans with no lesion found"),
                                                     ("normal_vs_lesion_auroc", "normal vs lesion AUROC (lesion score)"))
             if key in lesion]
    notes = [lesion["dice_note"]] if lesion.get("dice_note") else []
    if lesion.get("masks_not_used"):
        notes.append("masks not used: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in lesion["masks_not_used"].items()))
    groups = [[g, v.get("n_lesion_masks"), v.get("dice_mean"), v.get("lesions_found"), v.get("normal_vs_lesion_auroc")]
              for g, v in (lesion.get("per_group") or {}).items()]
    return ("<h3>Lesion outline</h3>" + _table(["figure", "value"], rows, "metrics")
            + (_table(["group", "lesion masks", "Dice mean", "lesions found", "normal vs lesion AUROC"], groups)
               if groups else "")
            + f'<p class="muted">a lesion is found where its score reaches {lesion["threshold"]:.3f} '
              f'({html.escape(lesion["threshold_from"])}); Dice interval: {html.escape(lesion.get("dice_ci_method", "–"))}'
            + "".join(f"; {html.escape(n)}" for n in notes) + "</p>")


def _binary_table(title: str, mvb: dict) -> str:
    def ci(v):
        return "–" if v is None else f"{v['estimate']:.3f} " + interval_text(v, mvb)
    rows = [[k.replace("_", " "), ci(v)] for k, v in mvb.items() if isinstance(v, dict) or (k.startswith(("auroc", "sens", "spec")))]
    return (f"<h3>{html.escape(title)}</h3>" + _table(["figure (95% CI)", "value"], rows, "metrics")
            + f'<p class="muted">{mvb["n"]} images ({mvb["n_malignant"]} malignant) of {mvb["n_clusters"]} '
              f'{"patients" if "patients" in mvb["ci_method"] else "images (each resampled alone)"}; '
              f'score {html.escape(mvb["score"])}; {html.escape(mvb["ci_method"])}</p>')


def interval_text(v: dict, mvb: dict) -> str:
    """[low, high], or 'too few' where the interval rests on fewer than 20 images or 10 patients."""
    if mvb.get("too_few") or v.get("ci_low") is None:
        return f"(too few: {mvb['n']} images, {mvb['n_clusters']} {'patients' if 'patients' in mvb['ci_method'] else 'groups'})"
    return f"[{v['ci_low']:.3f}, {v['ci_high']:.3f}]"


def _per_source(per_source: dict, held_out: bool = False) -> str:
    """One row per pooled source: how the model does on each hospital's images, not only on all of them together.
    held_out (cv --split source): each row is a hospital its fold model never saw, also after label-free adaptation."""
    def auc(m):
        mvb = m.get("malignant_vs_benign") or {}
        a = mvb.get("auroc")
        return "–" if not a else f"{a['estimate']:.3f} " + interval_text(a, mvb)

    def recall(m, c):
        return ((m.get("operating_point") or {}).get("per_class") or {}).get(c, {}).get("recall")

    def flagged(m):
        v = m.get("shift")
        return "–" if not v else f"{v['flagged']} of {v['n']}" + (" (outside)" if v["outside"] else "")
    header = ["source", "images", "accuracy", "macro-F1", "malignant vs benign AUROC (95% CI)",
              "malignant recall at the operating point", "normal recall", "flagged as unlike training", "classes absent"]
    rows = []
    for name, m in per_source.items():
        untrained = m.get("untrained_classes") or []

        def normal_recall(v):  # none where the fold model never learnt "normal"
            return None if "normal" in untrained else (v.get("per_class") or {}).get("normal", {}).get("recall")
        three = ["(not trained: " + ", ".join(untrained) + ")"] * 2 if untrained else [m["accuracy"], m["macro_f1"]]
        rows.append([name, m["n"], *three, auc(m), recall(m, "malignant"), normal_recall(m), flagged(m),
                     ", ".join(m.get("absent_classes", [])) or "–"])
        if held_out and "adapted" in m:
            a = m["adapted"]
            rows.append([f"{name}, adapted (busi adapt)", a["n"], *(three if untrained else [a["accuracy"], a["macro_f1"]]),
                         auc(a), recall(a, "malignant"), normal_recall(a), "–",
                         ", ".join(a.get("absent_classes", [])) or "–"])
    title = ("<h3>At a hospital it never saw: each source held out, its model trained on the others</h3>" if held_out
             else "<h3>Per source</h3>")
    return title + _table(header, rows, "metrics")


def _localization(loc: dict) -> str:
    rows = [[c, v["n"], v["energy_in_lesion"], v["pointing_game"]] for c, v in loc["per_class"].items() if v["n"]]
    status = ", ".join(f"{k} {v}" for k, v in loc.get("mask_status", {}).items())
    if loc.get("uniform_baseline") is not None:
        status += f". A heatmap spread evenly would score {loc['uniform_baseline']:.3f} on both (the lesions' mean area share)"
    against = loc.get("against")
    return (f"<h3>Where the model looked (Grad-CAM vs {html.escape(against or 'lesion masks')})</h3>"
            + _table(["class", "images with lesion mask", "heatmap energy in lesion", "pointing game"], rows)
            + f'<p class="muted">masks: {html.escape(status)}. {html.escape(loc.get("method", ""))}'
            + (f". {html.escape(loc['sample'])}" if loc.get("sample") else "") + "</p>")


def render(run: str | Path) -> Path:
    """Write run/report.html from the files in run/ and return its path."""
    run = Path(run)
    if not run.is_dir():
        raise BusiError(f"{run}: run folder does not exist")
    config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else None
    if config is None and not (run / "metrics.json").is_file():
        raise BusiError(f"{run}: not a busi run folder (no config.yaml or metrics.json)")
    kind = (config or {}).get("command", "run")
    body = [f"<h1>busi {html.escape(kind)} report</h1>",
            f'<p class="muted">{html.escape(str(run.resolve()))} · rendered {datetime.now():%Y-%m-%d %H:%M} · busi {__version__}</p>',
            '<p class="note">A research tool, not a diagnosis. '
            + ("Numbers describe these images only." if kind == "evaluate" else
               "Numbers describe this data set and split only.") + "</p>"]

    audit = _json(run / "audit.json")
    if audit:
        body.append("<h2>Data</h2>")
        body.append(_table(["class", "images"], [[c, n] for c, n in audit["classes"].items()]))
        body.append(f"<p>{audit['n_images']} readable images; {len(audit['duplicate_groups'])} near-duplicate groups holding "
                    f"{audit['duplicate_images']} images; {len(audit['label_conflicts'])} label conflicts (left out); "
                    f"{len(audit['skipped'])} files skipped.</p>")
    split = _json(run / "split.json")
    if split:
        body.append(f"<p>Split ({html.escape(split['split'])}, seed {split['seed']}): {len(split['train'])} train, "
                    f"{len(split['val'])} validation, {len(split['test'])} test images.</p>")
        if not split["test"]:
            body.append('<p class="note">No test part: every usable image trained the model. Measure it on images it '
                        "never saw with <code>busi evaluate --checkpoint CHECKPOINT --data HELDOUT</code>.</p>")
    folds = _json(run / "folds.json")
    if folds:
        sizes = ", ".join(str(len(f)) for f in folds["test_folds"][0])
        body.append(f"<p>Cross-validation ({html.escape(folds['split'])}, {folds['folds']} folds × {folds['repeats']} repeats, "
                    f"seed {folds['seed']}); test fold sizes {sizes}.</p>")

    cv = _json(run / "cv_metrics.json")
    if cv:
        body.append("<h2>Cross-validated metrics (95% CI)</h2>")
        for arch, s in cv.items():
            held_out = s.get("split") == "source"
            rows = [[name, v["estimate"], v["ci_low"], v["ci_high"]] for name, v in s["metrics"].items()]
            pooled = (_table(["metric", "estimate", "CI low", "CI high"], rows, "metrics")
                      + f'<p class="muted">{html.escape(s["ci_method"])}; mean training time {s["mean_train_seconds"]} s per '
                      f'fold; ECE {s["calibration"]["ece_before"]} → {s["calibration"]["ece_after"]} '
                      f'({html.escape(s["calibration"]["note"])}).</p>')
            body.append(f"<h3>{html.escape(arch)}</h3>")
            if held_out:  # the hospitals first; pooling them mixes two questions (and classes a fold never trained)
                body.append(_per_source(s["per_source"], held_out=True))
                body.append("<h3>Pooled over the held-out sources (for reference only)</h3>" + pooled)
            else:
                body.append(pooled)
                if s.get("per_source"):
                    body.append(_per_source(s["per_source"]))
            ext = s.get("external") or {}
            if ext.get("malignant_vs_benign"):
                body.append(_binary_table(f"{arch} on another hospital's images ({ext['data']}; {ext['method']})",
                                          ext["malignant_vs_benign"]))
            if s.get("localization", {}).get("per_class"):
                body.append(_localization(s["localization"]))
            body.append(_img(run / arch / "confusion_matrix.png", f"{arch}: pooled out-of-fold confusion matrix"))

    summary = run / "summary.csv"
    if summary.is_file():
        rows = list(csv.reader(summary.open()))
        body.append("<h2>Summary</h2>" + _table(rows[0], [[_num(v) for v in r] for r in rows[1:]], "metrics"))
    body.append(_img(run / "loss.png", "loss per epoch: training (solid), validation part (dotted) and test part "
                                       "(dashed) where the run has them"))
    if (run / "metrics.json").is_file():
        body.append(_model_section(run, (_json(run / "metrics.json") or {}).get("model", "model")))
    for sub in sorted(p for p in run.iterdir() if p.is_dir() and (p / "metrics.json").is_file()):
        body.append(_model_section(sub, sub.name))
    if config:
        unused = NOT_USED_BY.get(kind, ())  # config.yaml keeps every key; the page shows those that shaped this run
        if config.get("split") == "source":
            unused = (*unused, "folds")
        shown = {k: v for k, v in config.items() if k not in unused}
        body.append("<h2>Configuration</h2><pre>" + html.escape(yaml.safe_dump(shown, sort_keys=False)) + "</pre>"
                    + (f'<p class="muted">config.yaml also holds the keys this command does not use: '
                       f'{", ".join(k for k in config if k in unused)}.</p>' if len(shown) < len(config) else ""))
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>busi {html.escape(kind)} report</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>")
    out = run / "report.html"
    out.write_text(page)
    return out


def _num(v: str):
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v
