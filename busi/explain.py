"""Grad-CAM heatmaps (pytorch-grad-cam), overlays, and how well a heatmap falls on the lesion mask."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .data import mask_status_counts, normalize
from .models import IMAGENET_MEAN, IMAGENET_STD, Ensemble, last_conv_block


def gradcam(model: nn.Module, images: torch.Tensor, classes: list[int] | None = None, mean=IMAGENET_MEAN,
            std=IMAGENET_STD, batch_size: int = 4) -> np.ndarray:
    """N x H x W heatmaps in [0, 1] for uint8 NCHW images, for the given classes (default: the predicted ones). Small
    batches: a backward pass keeps every activation, about 100 MB an image at 224 px."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if classes is None:  # fix the target once, so ensemble members explain the same (the ensemble's) answer
        with torch.no_grad():
            classes = model.eval()(normalize(images, mean, std)).argmax(1).tolist()
    if isinstance(model, Ensemble):  # each member's map for the same class, averaged
        maps = np.mean([gradcam(m, images, classes, mean, std, batch_size) for m in model.members], axis=0)
        peak = maps.reshape(len(maps), -1).max(1).reshape(-1, 1, 1)
        return (maps / np.maximum(peak, 1e-8)).astype(np.float32)
    layer, _ = last_conv_block(model)  # raises a clear BusiError for a model without convolutions
    model = model.eval()
    maps = []
    # Grad-CAM needs the gradient at the target layer's output only: with the parameters before it frozen for the
    # call, the backward pass stops there instead of running through the whole encoder (several times faster on a CPU,
    # where depthwise convolutions' backward is slow); the heatmaps are the same
    wanted = {id(p) for p in layer.parameters()}
    before = {p: p.requires_grad for p in model.parameters()}
    if wanted:
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
    try:
        with GradCAM(model=model, target_layers=[layer]) as cam:
            for i in range(0, len(images), batch_size):
                x = normalize(images[i:i + batch_size], mean, std)
                targets = None if classes is None else [ClassifierOutputTarget(int(c)) for c in classes[i:i + batch_size]]
                maps.append(cam(input_tensor=x, targets=targets))
    finally:
        for p, needed in before.items():
            p.requires_grad_(needed)
    out = np.concatenate(maps).astype(np.float32)
    return np.nan_to_num(out).clip(0, 1)


def overlay(image: np.ndarray, heatmap: np.ndarray, polygon: list | None = None, caption: str | None = None,
            weight: float = 0.45) -> np.ndarray:
    """HxWx3 uint8 image with the heatmap blended on top in the jet colour map (heatmap resized to fit); the lesion
    outline (polygon [[x, y], ...] in the image's pixels) drawn in white, and a caption (class, probability) on top."""
    import cv2
    from pytorch_grad_cam.utils.image import show_cam_on_image

    if heatmap.shape != image.shape[:2]:  # e.g. a 224x224 map shown on the original 560x470 scan
        heatmap = cv2.resize(heatmap, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    out = show_cam_on_image(image.astype(np.float32) / 255.0, heatmap, use_rgb=True, image_weight=1 - weight)
    thick = max(1, round(min(image.shape[:2]) / 200))
    if polygon:
        cv2.polylines(out, [np.asarray(polygon, dtype=np.int32).reshape(-1, 1, 2)], True, (255, 255, 255), thick + 1,
                      cv2.LINE_AA)
    if caption:
        scale = max(0.4, min(image.shape[:2]) / 600)
        (w, h), base = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        cv2.rectangle(out, (0, 0), (w + 8, h + base + 8), (0, 0, 0), -1)
        cv2.putText(out, caption, (4, h + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return out


def localization(heatmap: np.ndarray, mask: np.ndarray) -> tuple[float, bool] | None:
    """(share of the heatmap's energy inside the lesion, whether its peak is inside) or None for an empty mask."""
    mask = mask.astype(bool)
    if not mask.any():
        return None
    total = float(heatmap.sum())
    energy = float(heatmap[mask].sum()) / total if total > 0 else 0.0
    peak = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return energy, bool(mask[peak])


def summarize_localization(heatmaps: np.ndarray, masks: list[np.ndarray], labels: list[int], classes: list[str],
                           mask_status: list[str]) -> dict:
    """Mean energy-in-lesion and pointing-game hit rate per class, over the images whose mask shows a lesion.

    heatmaps, masks and labels cover those images only; mask_status covers every image ('lesion', 'empty',
    'missing', 'size_mismatch', 'unreadable') and is counted, so nothing is dropped silently.
    """
    scores = [localization(h, m) for h, m in zip(heatmaps, masks)]
    per_class: dict[str, dict] = {}
    for c_index, c in enumerate(classes):
        mine = [sc for sc, y in zip(scores, labels) if y == c_index and sc is not None]
        per_class[c] = {"n": len(mine),
                        "energy_in_lesion": round(float(np.mean([sc[0] for sc in mine])), 4) if mine else None,
                        "pointing_game": round(float(np.mean([sc[1] for sc in mine])), 4) if mine else None}
    every = [sc for sc in scores if sc is not None]
    areas = [float(m.mean()) for m in masks if m.any()]
    return {"per_class": per_class, "mask_status": mask_status_counts(mask_status),
            "energy_in_lesion": round(float(np.mean([s[0] for s in every])), 4) if every else None,
            "pointing_game": round(float(np.mean([s[1] for s in every])), 4) if every else None,
            # what a heatmap spread evenly over the image (or a random peak) would score: the lesions' mean area share
            "uniform_baseline": round(float(np.mean(areas)), 4) if areas else None,
            "method": "Grad-CAM of the predicted class on the last convolutional block; energy = share of heatmap mass "
                      "inside the union of the image's lesion masks; pointing game = heatmap maximum inside the mask"}
