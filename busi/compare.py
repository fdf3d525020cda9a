"""Two or more models side by side on the same labelled images: each at its own stored rule, with intervals, and
which keeps its recall target (busi evaluate --compare PARENT)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .operating import POSITIVE, decide, outcome_intervals, rule_outcomes

FIGURES = ("sensitivity", "specificity", "normal_recall", "lesions_called_normal", "accuracy")


def at_rule(probs: torch.Tensor, scores: torch.Tensor | None, labels: torch.Tensor, classes, rule: dict | None,
            clusters, n_boot: int = 1000, seed: int = 0) -> dict:
    """What one model's stored rule decides on these images, with 95% bootstrap intervals over clusters (patients)."""
    classes = list(classes)
    m, b = classes.index(POSITIVE), classes.index("benign")
    n = classes.index("normal") if "normal" in classes else -1
    called = decide(probs, classes, rule, scores)
    out = {k: v for k, v in rule_outcomes(called, labels, m, b, n).items() if k in FIGURES}
    out["ci"] = {k: v for k, v in outcome_intervals(called, labels, m, b, n, clusters, n_boot, seed).items()
                 if k in FIGURES}
    target = (rule or {}).get("target_recall")
    out["target_recall"] = target
    out["keeps_target"] = None if target is None or out["sensitivity"] is None else bool(out["sensitivity"] >= target)
    return out


def compare(models: dict[str, str | Path], data, patients: list[str] | None = None, engine: str = "auto",
            progress: bool = True) -> dict:
    """{name: at_rule figures} for each model on the same readable images of data (a class-folder set, some of the
    models' classes or all); patients: per image (in scan order) for the intervals, else images."""
    from .data import scan
    from .evaluate import _stream
    from .external import relabel
    from .inference import LoadedModel, decision_scores
    out = {}
    for name, path in models.items():
        loaded = LoadedModel(path)
        dataset, _ = relabel(scan(data), loaded.config["classes"], str(path))
        by_path = dict(zip((s.path for s in dataset.samples), patients)) if patients else {}
        loaded.use_engine(engine, len(dataset.samples))
        seen = _stream(loaded, dataset, progress)
        kept = [s.path for s in seen["dataset"].samples]
        clusters = np.asarray([by_path.get(p, p) for p in kept]).astype(str)
        out[name] = {"checkpoint": str(path), "images": len(kept),
                     **at_rule(seen["probs"], decision_scores(loaded.config, seen.get("lesion_scores"),
                                                              seen.get("distances")), seen["labels"], loaded.config["classes"],
                               loaded.config.get("operating_point"), clusters)}
    return out


def lines(comparison: dict) -> list[str]:
    """The comparison for the terminal: a row per model, then which keeps its recall target."""
    names = {"sensitivity": "malignant recall", "specificity": "specificity", "normal_recall": "normal recall",
             "lesions_called_normal": "lesions called normal", "accuracy": "accuracy"}
    out = ["  model | " + " | ".join(names.values())]
    for name, f in comparison.items():
        cells = []
        for k in FIGURES:
            v, ci = f[k], f["ci"].get(k)
            cells.append("–" if v is None else f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
        out.append(f"  {name} ({f['images']} images) | " + " | ".join(cells))
    for name, f in comparison.items():
        if f["keeps_target"] is not None:
            out.append(f"  {name} {'keeps' if f['keeps_target'] else 'does NOT keep'} its recall target "
                       f"({f['sensitivity']:.1%} of the cancers found here, {f['target_recall']:.0%} promised)")
        else:
            out.append(f"  {name} has no recall target (no stored rule, or no malignant image here)")
    return out
