"""Matplotlib figures for a run folder: loss curves, confusion matrices, galleries of images."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; works on servers with no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def loss_curves(histories: dict[str, list[dict]], path: Path) -> str:
    """Training loss per epoch for every model (solid), validation loss dotted and test loss dashed where measured.

    Every point stays on the chart: when early losses dwarf the rest, the y axis turns logarithmic (and says so)
    rather than cutting them off. Returns the scale used, 'linear' or 'log'."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (name, rows) in enumerate(histories.items()):
        color = f"C{i}"
        epochs = [r["epoch"] for r in rows]
        ax.plot(epochs, [r["train_loss"] for r in rows], color=color, marker=".", label=f"{name} train")
        if rows and "val_loss" in rows[0]:
            ax.plot(epochs, [r.get("val_loss", float("nan")) for r in rows], color=color, ls=":", label=f"{name} validation")
        if rows and "test_loss" in rows[0]:
            ax.plot(epochs, [r["test_loss"] for r in rows], color=color, ls="--", label=f"{name} test")
    values = np.array([r[k] for rows in histories.values() for r in rows for k in ("train_loss", "val_loss", "test_loss")
                       if k in r], dtype=float)
    values = values[np.isfinite(values) & (values > 0)]
    scale = "linear"
    if len(values) and values.max() > 3 * np.percentile(values, 90):  # early spikes would flatten every other curve
        scale = "log"
        ax.set_yscale("log")
    ax.set(xlabel="epoch", ylabel="cross-entropy loss" + (" (log scale)" if scale == "log" else ""), title="Loss per epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    return scale


def confusion_matrix(matrix: list[list[int]], classes: list[str], path: Path, title: str = "") -> None:
    """Two panels: counts, and the same normalised by true class (each row sums to 1)."""
    m = np.asarray(matrix)
    share = m / np.maximum(m.sum(1, keepdims=True), 1)
    size = 1.2 * len(classes) + 1.5
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size))
    for ax, values, fmt, name in ((axes[0], m, lambda v: f"{v:d}", "counts"),
                                  (axes[1], share, lambda v: f"{v:.0%}", "share of true class")):
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, fmt(values[i, j]), ha="center", va="center", color="white" if share[i, j] > 0.6 else "black")
        ax.set_xticks(range(len(classes)), classes)
        ax.set_yticks(range(len(classes)), classes)
        ax.set(xlabel="predicted", ylabel="true", title=name)
    fig.suptitle(title or "Confusion matrix")
    _save(fig, path)


def roc_curves(curves: dict[str, tuple[np.ndarray, np.ndarray, float | None]], path: Path, title: str = "") -> None:
    """One-vs-rest ROC per class: name -> (false positive rate, true positive rate, AUROC)."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auc:.3f})" if auc is not None else f"{name} (no positives)")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title or "ROC, one class vs the rest",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    _save(fig, path)


def reliability_diagram(panels: dict[str, tuple[list[dict], float]], path: Path) -> None:
    """Accuracy against confidence per bin, one panel per variant (e.g. before/after temperature scaling)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.4), squeeze=False)
    for ax, (name, (bins, ece)) in zip(axes[0], panels.items()):
        full = [b for b in bins if b["n"]]
        ax.bar([b["low"] for b in full], [b["accuracy"] for b in full], width=[b["high"] - b["low"] for b in full],
               align="edge", edgecolor="black", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], color="grey", ls="--", label="perfect calibration")
        ax.plot([b["confidence"] for b in full], [b["accuracy"] for b in full], "o", color="C3", ms=3, label="bin mean")
        ax.set(xlabel="confidence (top class)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=f"{name}: ECE {ece:.3f}")
        ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)


def gallery(images: list[np.ndarray], captions: list[str], path: Path, title: str, columns: int = 5,
            colors: list[str] | None = None) -> None:
    """A grid of HxWx3 uint8 images with a caption under each; an empty list gives a page saying so."""
    if not images:
        fig, ax = plt.subplots(figsize=(5, 1.2))
        ax.axis("off")
        ax.text(0.5, 0.5, f"{title}: none", ha="center", va="center")
        _save(fig, path)
        return
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.9 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(images):
            ax.imshow(images[k])
            ax.set_title(captions[k], fontsize=8, color=(colors[k] if colors else "black"))
    fig.suptitle(title)
    _save(fig, path)
