"""A sensitivity-first operating point: the malignant-probability threshold that reaches a target recall, applied."""
from __future__ import annotations

import math

import numpy as np
import torch

from .errors import BusiError

POSITIVE = "malignant"
MIN_POSITIVES = 10  # fewer malignant images (or patients) than this promise no recall: refused


def fit_threshold(probs: torch.Tensor, labels: torch.Tensor, classes, target_recall: float) -> dict | None:
    """The highest threshold on p(malignant) at which at least target_recall of the malignant images are called so.

    Fitted on the validation part (never on a test part); None when there is no malignant class or image to fit on.
    """
    if POSITIVE not in classes:
        return None
    k = list(classes).index(POSITIVE)
    positives = probs[labels == k, k].sort(descending=True).values
    if len(positives) == 0:
        return None
    needed = max(1, math.ceil(target_recall * len(positives) - 1e-9))
    threshold = float(positives[needed - 1])
    return {"class": POSITIVE, "threshold": round(threshold, 6), "target_recall": target_recall,
            "fitted_on": int(len(labels)), "fitted_on_positives": int(len(positives)),
            "recall_where_fitted": round(float((positives >= threshold).float().mean()), 4)}


def decide(probs: torch.Tensor, classes, operating_point: dict | None) -> torch.Tensor:
    """Predicted class per row: the operating point's class wherever its probability reaches the threshold, else the
    most probable of the other classes; plain argmax without an operating point."""
    if not operating_point or operating_point.get("class") not in classes:
        return probs.argmax(1)
    k = list(classes).index(operating_point["class"])
    others = probs.clone()
    others[:, k] = -1
    return torch.where(probs[:, k] >= operating_point["threshold"], torch.full_like(probs[:, 0], k, dtype=torch.long),
                       others.argmax(1))


def describe(operating_point: dict | None) -> str:
    if not operating_point:
        return "argmax (no operating point)"
    where = operating_point.get("fitted_where", "validation images")
    return (f"'{operating_point['class']}' whenever its probability is at least {operating_point['threshold']:.3f} "
            f"(set for {operating_point['target_recall']:.0%} recall on {operating_point['fitted_on']} {where}"
            + (f", {operating_point['fitted_on_positives']} of them malignant)" if "fitted_on_positives" in operating_point
               else ")"))


def metrics_at(probs: torch.Tensor, labels: torch.Tensor, classes, operating_point: dict) -> dict:
    """Accuracy, per-class recall/precision and the confusion matrix of the operating point's decisions."""
    return {"threshold": operating_point["threshold"], "class": operating_point["class"],
            **decision_metrics(decide(probs, classes, operating_point), labels, classes)}


def decision_metrics(predicted: torch.Tensor, labels: torch.Tensor, classes) -> dict:
    """Accuracy, per-class recall/precision and confusion matrix of hard decisions (rows: true class)."""
    k = len(classes)
    confusion = torch.bincount(labels * k + predicted, minlength=k * k).view(k, k)
    per_class = {}
    for i, c in enumerate(classes):
        called, actual = int(confusion[:, i].sum()), int(confusion[i].sum())
        per_class[c] = {"recall": round(int(confusion[i, i]) / actual, 6) if actual else None,
                        "precision": round(int(confusion[i, i]) / called, 6) if called else None}
    return {"accuracy": round(float((predicted == labels).float().mean()), 6) if len(labels) else None,
            "per_class": per_class, "confusion_matrix": confusion.tolist()}


def fit_with_ci(probs: torch.Tensor, labels: torch.Tensor, classes, target_recall: float, clusters=None,
                n_boot: int = 1000, seed: int = 0, where: str = "these images") -> dict:
    """fit_threshold on every image, and the recall that threshold can promise on new images of the same kind: the
    threshold refitted on bootstrap resamples of patients (or images), each judged on the malignant images its
    resample left out; their 2.5-97.5% range is the interval, their median the expected recall.

    Refuses (BusiError) with fewer than MIN_POSITIVES malignant images or patients."""
    if POSITIVE not in classes:
        raise BusiError(f"the model has no '{POSITIVE}' class to set a threshold for")
    k = list(classes).index(POSITIVE)
    clusters = np.asarray([str(c) for c in clusters] if clusters is not None else np.arange(len(labels)).astype(str))
    positive = (labels == k).numpy()
    n_pos, n_pos_clusters = int(positive.sum()), len(set(clusters[positive].tolist()))
    if min(n_pos, n_pos_clusters) < MIN_POSITIVES:
        raise BusiError(f"{where}: {n_pos} malignant image(s) of {n_pos_clusters} patient(s): at least {MIN_POSITIVES} "
                        "are needed to set a threshold that promises a recall")
    point = fit_threshold(probs, labels, classes, target_recall)
    names, inverse = np.unique(clusters, return_inverse=True)
    rng = np.random.default_rng(seed)
    recalls = []
    for _ in range(n_boot):
        picked = rng.integers(0, len(names), len(names))
        inside = np.isin(inverse, picked)
        left_out = ~inside & positive
        bag = torch.from_numpy(np.concatenate([np.flatnonzero(inverse == g) for g in picked]))
        fitted = fit_threshold(probs[bag], labels[bag], classes, target_recall)
        if fitted is None or not left_out.any():
            continue
        recalls.append(float((probs[torch.from_numpy(left_out), k] >= fitted["threshold"]).float().mean()))
    negatives = labels != k
    point.update({
        "fitted_on_patients": len(names) if len(names) < len(labels) else None,
        "expected_recall": round(float(np.median(recalls)), 4) if recalls else None,
        "recall_ci": [round(float(np.quantile(recalls, 0.025)), 4), round(float(np.quantile(recalls, 0.975)), 4)]
        if recalls else None,
        "ci_method": f"threshold refitted on {len(recalls)} bootstrap resamples of "
                     f"{'patients' if len(names) < len(labels) else 'images'}, recall measured on the malignant images "
                     "each left out; 2.5-97.5% range",
        "others_called_malignant": round(float((probs[negatives, k] >= point["threshold"]).float().mean()), 4)
        if negatives.any() else None})
    return point
