"""Matplotlib figures for a run folder: loss curves, confusion matrices, galleries of images."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; works on servers with no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def loss_curves(histories: dict[str, list[dict]], path: Path) -> None:
    """Training loss per epoch for every model (solid), test loss dashed where it was measured."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (name, rows) in enumerate(histories.items()):
        color = f"C{i}"
        epochs = [r["epoch"] for r in rows]
        ax.plot(epochs, [r["train_loss"] for r in rows], color=color, marker=".", label=f"{name} train")
        if rows and "test_loss" in rows[0]:
            ax.plot(epochs, [r["test_loss"] for r in rows], color=color, ls="--", label=f"{name} test")
    ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="Training loss per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def confusion_matrix(matrix: list[list[int]], classes: list[str], path: Path, title: str = "") -> None:
    """Counts, with the share of each true class in brackets."""
    m = np.asarray(matrix)
    share = m / np.maximum(m.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.4 * len(classes) + 2, 1.2 * len(classes) + 1.5))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{m[i, j]}\n({share[i, j]:.0%})", ha="center", va="center",
                    color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title or "Confusion matrix")
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
