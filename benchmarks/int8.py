"""A lighter network: the bundled model's ONNX graph quantised to int8 (ONNX Runtime, static, calibrated on training
images), and the mirrored pass left out, each against the float32 graph on every image of the given sources.

    python benchmarks/int8.py --data ../shared/data/busi_dev --data ../shared/data/busbra_dev \
        --data ../shared/data/uclm_dev --calibrate 32 --md TABLE.md

Per variant: the share of decisions (the stored rule's class) that change, the largest change of a class probability
and of a lesion score, malignant-vs-benign and normal-vs-lesion AUROC per source beside float32's, and the bare
graph's images/s on batches of 32 (the same preloaded images, variants alternated, best of --repeats) on this machine.
busi adopts a variant by default only if it changes at most 1% of the decisions and no AUROC by more than 0.005
(issue 37). Calibration images: the first --calibrate of each source in a fixed shuffle; they are scored too (the
bundled model trained on every image here).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from busi.bundled import default_checkpoint  # noqa: E402
from busi.engine import Graph, OnnxEngine, _export  # noqa: E402
from busi.errors import BusiError  # noqa: E402
from busi.export import onnx_session  # noqa: E402
from busi.inference import LoadedModel, run_model  # noqa: E402

NAMES = {"busi_dev": "BUSI", "busbra_dev": "BUS-BRA", "uclm_dev": "BUS-UCLM"}


def images_of(loaded: LoadedModel, folders: list[Path], limit: int | None = None) -> tuple[torch.Tensor, list[str], list[str]]:
    """(uint8 N x 3 x S x S model inputs, true classes, sources) of every image (masks left out) in class folders."""
    files = []
    for folder in folders:
        for cls in ("benign", "malignant", "normal"):
            files += [(p, cls, folder.name) for p in sorted((folder / cls).glob("*"))
                      if p.suffix.lower() in (".png", ".jpg", ".jpeg") and "_mask" not in p.name][:limit]

    def one(item):
        try:
            return loaded.prepare(item[0]).input
        except BusiError as e:
            print(f"skipped: {e}", file=sys.stderr)
            return None
    with ThreadPoolExecutor(max_workers=2) as pool:
        inputs = list(pool.map(one, files))
    kept = [i for i, x in enumerate(inputs) if x is not None]
    return (torch.cat([inputs[i] for i in kept]), [files[i][1] for i in kept], [files[i][2] for i in kept])


# int8 variants: which parts stay float32 (by the PyTorch module path the exporter records per node) and how the
# activations' ranges are read. Decisions moved by int8 trace back to a few sensitive layers or to outliers that stretch
# a min-max range, so each lever is tried alone.
VARIANTS = {
    "int8": ((), "minmax"),
    "int8, percentile ranges": ((), "percentile"),
    "int8, stems and heads float": ((".conv_stem", ".conv_head", "classifier.classifier", "segmenter.head"), "minmax"),
    "int8, segmenter decoder float": (("segmenter.decoder", "segmenter.head"), "minmax"),
    "int8, segmenter float": (("model.segmenter",), "minmax"),
    "int8, classifier float": (("model.classifier",), "minmax"),
}


def scoped(float_path: Path, parts: tuple[str, ...]) -> list[str]:
    """Names of the nodes the exporter placed in a module whose path contains one of parts (kept float32)."""
    import onnx
    names = []
    for node in onnx.load(str(float_path)).graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        if any(part in scopes for part in parts):
            names.append(node.name)
    return names


def quantised(float_path: Path, calibration: torch.Tensor, out: Path, keep_float: tuple[str, ...] = (),
              ranges: str = "minmax") -> Path:
    """The graph with int8 weights (per channel) and activations whose ranges were read on the calibration images;
    nodes of the modules named in keep_float stay float32."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quant_pre_process, quantize_static)

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.left = iter([{"images": calibration[i:i + 8].numpy()} for i in range(0, len(calibration), 8)])

        def get_next(self):
            return next(self.left, None)
    prepared = out.with_name("prepared.onnx")
    if not prepared.exists():
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}[ranges]
    quantize_static(str(prepared), str(out), Batches(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    nodes_to_exclude=scoped(float_path, keep_float) if keep_float else None,
                    calibrate_method=method, extra_options={"CalibPercentile": 99.999})
    return out


def auroc(truth: np.ndarray, score: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(truth, score)) if 0 < truth.sum() < len(truth) else None


def figures(said, labels: list[str], sources: list[str]) -> dict:
    classes = ["benign", "malignant", "normal"]
    out = {}
    for source in sorted(set(sources)):
        idx = [i for i, s in enumerate(sources) if s == source]
        lesion = [i for i in idx if labels[i] != "normal"]
        mal = np.array([labels[i] == "malignant" for i in lesion])
        p_mal = said.probs[lesion, classes.index("malignant")].numpy()
        out[source] = {"malignant_vs_benign_auroc": auroc(mal, p_mal)}
        if said.lesion_scores is not None:
            out[source]["normal_vs_lesion_auroc"] = auroc(np.array([labels[i] != "normal" for i in idx]),
                                                          said.lesion_scores[idx].numpy())
    return out


def images_per_second(session, images: np.ndarray, batch: int = 32) -> float:
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        session.run(None, {"images": images[i:i + batch]})
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, action="append", required=True)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--calibrate", type=int, default=32, help="calibration images per source")
    ap.add_argument("--timed", type=int, default=256, help="images in each timing pass")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=int, help="at most this many images of each class folder (a quick try)")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                    help="int8 variants to build (the mirrored pass left out is always measured)")
    ap.add_argument("--md", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    checkpoint = args.checkpoint or default_checkpoint()
    loaded = LoadedModel(checkpoint)
    model, config, extras = loaded.checkpoint("the benchmark")
    started = time.perf_counter()
    images, labels, sources = images_of(loaded, args.data, args.limit)
    print(f"{len(images)} images prepared in {time.perf_counter() - started:.0f} s", flush=True)
    order = list(range(len(images)))
    random.Random(0).shuffle(order)
    calibration = torch.cat([images[[i for i in order if sources[i] == s][:args.calibrate]] for s in sorted(set(sources))])
    reference = OnnxEngine(checkpoint, model, config)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        variants = {"float32": reference.path}
        for i, name in enumerate(args.variants):
            keep_float, ranges = VARIANTS[name]
            variants[name] = quantised(reference.path, calibration, tmp / f"int8-{i}.onnx", keep_float, ranges)
            print(f"{name}: quantised", flush=True)
        no_tta = {**config, "tta": False}
        _export(Graph(model, no_tta), no_tta, tmp / "no-mirror.onnx")
        variants["float32, no mirrored pass"] = tmp / "no-mirror.onnx"
        sessions = {name: onnx_session(path) for name, path in variants.items()}
        said = {}
        for name, session in sessions.items():
            reference.session = session
            said[name] = run_model(model, config, extras, images, reference)
            print(f"{name}: scored", flush=True)
        timed = images[:args.timed].numpy()
        speed = {name: 0.0 for name in sessions}
        for _ in range(args.repeats):  # alternated, best of the repeats: the machine's other work evens out
            for name, session in sessions.items():
                speed[name] = max(speed[name], images_per_second(session, timed))
    base = said["float32"]
    base_figures = figures(base, labels, sources)
    rows = {}
    for name, s in said.items():
        mine = figures(s, labels, sources)
        worst = max(abs(v - base_figures[src][k]) for src, f in mine.items() for k, v in f.items() if v is not None)
        decisions = float((s.predicted != base.predicted).float().mean())
        rows[name] = {"decisions_changed": decisions,
                      "max_probability_change": float((s.probs - base.probs).abs().max()),
                      "max_lesion_score_change": None if s.lesion_scores is None
                      else float((s.lesion_scores - base.lesion_scores).abs().max()),
                      "images_per_second": round(speed[name], 1), "speed_vs_float32": round(speed[name] / speed["float32"], 2),
                      "per_source": mine, "max_auroc_change": worst, "adoptable": decisions <= 0.01 and worst <= 0.005}
    result = {"images": len(images), "calibration_images": len(calibration), "variants": rows}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    header = ("| variant | images/s (× float32) | decisions changed | largest change: probability / lesion score | "
              + " | ".join(f"{NAMES.get(s, s)}: mal-vs-ben / normal-vs-lesion AUROC" for s in sorted(set(sources)))
              + " | adoptable (≤ 1%, ≤ 0.005) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, r in rows.items():
        cells = []
        for src in sorted(set(sources)):
            f = r["per_source"][src]
            cells.append(" / ".join("–" if v is None else f"{v:.3f}" for v in f.values()))
        lesion = "–" if r["max_lesion_score_change"] is None else f"{r['max_lesion_score_change']:.3f}"
        lines.append(f"| {name} | {r['images_per_second']} ({r['speed_vs_float32']}×) | {r['decisions_changed']:.1%} | "
                     f"{r['max_probability_change']:.3f} / {lesion} | " + " | ".join(cells)
                     + f" | {'yes' if r['adoptable'] else 'no'} |")
    print("\n".join(lines))
    if args.md:
        args.md.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
