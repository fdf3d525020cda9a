"""Calibration: expected calibration error, reliability bins, and temperature scaling fitted on held-out data."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_calibration_error

N_BINS = 15


def ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = N_BINS) -> float:
    """Expected calibration error of the top-class confidence (torchmetrics, L1, equal-width bins)."""
    return float(multiclass_calibration_error(probs.float(), labels.long(), probs.shape[1], n_bins=n_bins, norm="l1"))


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = N_BINS) -> list[dict]:
    """Per confidence bin: mean confidence, accuracy and count, for the reliability diagram."""
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    bins = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        n = int(inside.sum())
        bins.append({"low": round(float(lo), 4), "high": round(float(hi), 4), "n": n,
                     "confidence": round(float(confidence[inside].mean()), 4) if n else None,
                     "accuracy": round(float(correct[inside].mean()), 4) if n else None})
    return bins


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    return float(F.cross_entropy(logits / temperature, labels))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) (Guo et al., 2017)."""
    log_t = torch.zeros(1, requires_grad=True)  # optimise log T so T stays positive
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")
    logits, labels = logits.detach().float(), labels.long()

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss
    optimizer.step(closure)
    t = float(log_t.detach().exp())
    return t if 0.05 < t < 20 else 1.0  # a runaway fit on a tiny or degenerate set is not trusted
