"""A sensitivity-first operating point: the malignant-probability threshold that reaches a target recall, applied."""
from __future__ import annotations

import math

import torch

POSITIVE = "malignant"


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
    return (f"'{operating_point['class']}' whenever its probability is at least {operating_point['threshold']:.3f} "
            f"(set for {operating_point['target_recall']:.0%} recall on {operating_point['fitted_on']} validation images)")


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
