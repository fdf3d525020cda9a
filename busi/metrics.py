"""Predicted probabilities -> metrics.json (torchmetrics, averages always explicit)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torchmetrics.classification import (MulticlassAccuracy, MulticlassAUROC, MulticlassConfusionMatrix,
                                         MulticlassF1Score, MulticlassPrecision, MulticlassRecall)


def _clean(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), 6)


def compute_metrics(probs: torch.Tensor, labels: torch.Tensor, classes: list[str] | tuple[str, ...]) -> dict:
    """Accuracy (micro), macro precision/recall/F1/AUROC (one-vs-rest), per-class scores, confusion matrix."""
    k = len(classes)
    probs, labels = probs.float(), labels.long()
    kw = dict(num_classes=k, zero_division=0)
    per_precision = MulticlassPrecision(average="none", **kw)(probs, labels)
    per_recall = MulticlassRecall(average="none", **kw)(probs, labels)
    per_f1 = MulticlassF1Score(average="none", **kw)(probs, labels)
    support = torch.bincount(labels, minlength=k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # AUROC warns when a class is absent; we report null instead
        per_auroc = MulticlassAUROC(num_classes=k, average="none")(probs, labels)
        auroc = MulticlassAUROC(num_classes=k, average="macro")(probs, labels)
    present = support > 0
    macro = {"macro_precision": MulticlassPrecision(average="macro", **kw)(probs, labels),
             "macro_recall": MulticlassRecall(average="macro", **kw)(probs, labels),
             "macro_f1": MulticlassF1Score(average="macro", **kw)(probs, labels)}
    if not bool(present.all()):  # a folder with a subset of the classes: average over the classes it has
        macro = {"macro_precision": per_precision[present].mean(), "macro_recall": per_recall[present].mean(),
                 "macro_f1": per_f1[present].mean()}
    out = {
        "n": int(len(labels)),
        "classes": list(classes),
        "accuracy": _clean(MulticlassAccuracy(num_classes=k, average="micro")(probs, labels)),
        **{k: _clean(v) for k, v in macro.items()},
        # one-vs-rest AUROC is undefined for a class with no positive (or no negative) example
        "auroc": _clean(auroc) if bool(present.all()) and int(present.sum()) > 1 else None,
        "per_class": {
            c: {"precision": _clean(per_precision[i]), "recall": _clean(per_recall[i]) if present[i] else None,
                "f1": _clean(per_f1[i]) if present[i] else None,
                "auroc": _clean(per_auroc[i]) if present[i] and support[i] < len(labels) else None,
                "support": int(support[i])}
            for i, c in enumerate(classes)
        },
        "confusion_matrix": MulticlassConfusionMatrix(num_classes=k)(probs, labels).tolist(),
    }
    if not bool(present.all()):
        out["absent_classes"] = [c for i, c in enumerate(classes) if not present[i]]
        out["note"] = ("macro averages over the classes present; an absent class's precision counts the images "
                       "wrongly called it")
    return out


def majority_baseline(labels: torch.Tensor, num_classes: int) -> float:
    """Accuracy of always answering the most common class: the floor any model must beat."""
    return float(torch.bincount(labels, minlength=num_classes).max()) / max(1, len(labels))


def _point_metrics(probs: torch.Tensor, labels: torch.Tensor, k: int) -> dict[str, float]:
    from torchmetrics.functional.classification import multiclass_auroc, multiclass_f1_score, multiclass_recall
    out = {"accuracy": float((probs.argmax(1) == labels).float().mean()),
           "macro_f1": float(multiclass_f1_score(probs, labels, k, average="macro", zero_division=0))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["auroc"] = float(multiclass_auroc(probs, labels, k, average="macro"))
    recall = multiclass_recall(probs, labels, k, average="none", zero_division=0)
    for i in range(k):
        out[f"recall_{i}"] = float(recall[i])
    return out


def cluster_resamples(clusters, n_boot: int, seed: int = 0):
    """Index arrays of n_boot bootstrap resamples that draw whole clusters (patients, duplicate groups) with
    replacement: one patient's images are not independent evidence, and resampling them one by one would make every
    interval too narrow."""
    _, inverse = np.unique(np.asarray(clusters).astype(str), return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1 if len(inverse) else 0)]
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])


def bootstrap_ci(probs: torch.Tensor, labels: torch.Tensor, groups, classes, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict:
    """Point estimate and percentile CI of accuracy, macro-F1, macro-AUROC and per-class recall.

    Resamples whole duplicate groups (a cluster bootstrap), not single images: near-copies of one scan
    are not independent evidence, and treating them so would make the interval too narrow.
    """
    k = len(classes)
    samples: dict[str, list[float]] = {}
    for pick in cluster_resamples(groups, n_boot, seed):
        for name, value in _point_metrics(probs[pick], labels[pick], k).items():
            samples.setdefault(name, []).append(value)
    point = _point_metrics(probs, labels, k)
    rename = {f"recall_{i}": f"recall_{c}" for i, c in enumerate(classes)}
    alpha = (1 - level) / 2
    return {rename.get(name, name): {"estimate": round(point[name], 4),
                                     "ci_low": round(float(np.nanquantile(v, alpha)), 4),
                                     "ci_high": round(float(np.nanquantile(v, 1 - alpha)), 4)}
            for name, v in samples.items()}
