"""The lesion a model outlines: its score (is there one?), outline and measurements, and Dice/IoU against masks."""
from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

LESION_LEVEL = 0.5  # a pixel belongs to the outline where the segmenter's probability reaches this
SCORE_POOL = 3  # the lesion score is the peak of the map averaged over 3x3 cells: one bright cell is no lesion
MAX_POINTS = 64  # an outline's polygon is simplified to about this many corners (JSON stays small)
TOO_FEW_UNITS = 10  # fewer patients (or images) than this give no Dice interval (busi.external's rule for patients)


def lesion_scores(maps: torch.Tensor) -> torch.Tensor:
    """Per N1HW probability map, how surely it holds a lesion: the peak of its locally averaged probability."""
    if maps.numel() == 0:
        return torch.zeros(len(maps))
    smooth = F.avg_pool2d(maps.float(), SCORE_POOL, stride=1, padding=SCORE_POOL // 2, count_include_pad=False)
    return smooth.flatten(1).amax(1)


def decision_outline(prob_map: np.ndarray, height: int, width: int, called_lesion: bool,
                     mm_per_pixel: tuple[float, float] | None = None) -> dict | None:
    """The outline that goes with a decision: none for a scan called normal, whatever faint spots its map holds; for a
    scan called benign or malignant the lesion it was judged on, so a lesion decision never comes with 'no lesion'.
    Outlined at LESION_LEVEL where the map reaches it, else at half the map's peak (the region the lesion score came
    from; 'faint' says so): the lesion threshold of the rule can sit well below LESION_LEVEL."""
    if not called_lesion:
        return None
    found = outline(prob_map, height, width, mm_per_pixel)
    if found is None and float(prob_map.max()) > 0:
        level = float(prob_map.max()) / 2
        found = outline(prob_map, height, width, mm_per_pixel, level)
        if found is not None:
            found.update({"faint": True, "level": round(level, 4)})
    return found


def dice_iou(maps: torch.Tensor, masks: torch.Tensor, mask_status: list[str] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, Dice and IoU of the outline (map >= LESION_LEVEL) against a mask (N1SS, any size: resized to the
    map's grid). Both empty (a normal scan outlined as lesion-free) counts as 1, as agreement. With mask_status
    (busi.data.load_masks), images whose mask is not usable get NaN: no mask is taken to mean 'no lesion'."""
    target = F.interpolate(masks.float(), size=maps.shape[-2:], mode="area") >= 0.5
    predicted = maps.float() >= LESION_LEVEL
    inter = (predicted & target).flatten(1).sum(1).float()
    p, t = predicted.flatten(1).sum(1).float(), target.flatten(1).sum(1).float()
    union = p + t - inter
    both_empty = (p + t) == 0
    dice = torch.where(both_empty, torch.ones_like(inter), 2 * inter / (p + t).clamp_min(1))
    iou = torch.where(both_empty, torch.ones_like(inter), inter / union.clamp_min(1))
    if mask_status is not None:
        usable = torch.tensor([st in ("lesion", "empty") for st in mask_status])
        dice = torch.where(usable, dice, torch.tensor(float("nan")))
        iou = torch.where(usable, iou, torch.tensor(float("nan")))
    return dice, iou


def outline(prob_map: np.ndarray, height: int, width: int, mm_per_pixel: tuple[float, float] | None = None,
            level: float = LESION_LEVEL) -> dict | None:
    """The largest lesion of a probability map, in the pixels of the image the model saw (height x width, before
    resizing; busi.inference places it on the file's image). -> box [x0, y0, x1, y1], area,
    width, depth (its vertical extent: depth into the breast) and their ratio (depth-to-width above 1, 'taller than
    wide', is a BI-RADS sign of malignancy), and the polygon [[x, y], ...]; in millimetres too where the pixel size is
    known. None when nothing reaches level (LESION_LEVEL unless told).
    """
    grid = cv2.resize(prob_map.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    binary = (grid >= level).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if n <= 1:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    component = (labels == largest).astype(np.uint8)
    contours, _ = cv2.findContours(component, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    contour = max(contours, key=cv2.contourArea)
    epsilon = max(0.5, cv2.arcLength(contour, True) / (MAX_POINTS * 2))
    polygon = cv2.approxPolyDP(contour, epsilon, True)[:, 0, :]
    x, y, w, h = (int(v) for v in cv2.boundingRect(component))
    found = {"box": [x, y, x + w, y + h], "area_px": int(component.sum()),
             "width_px": w, "depth_px": h, "depth_to_width": round(h / w, 3) if w else None,
             "lesions_found": n - 1, "peak_probability": round(float(grid[component > 0].max()), 4),
             "polygon": [[int(px), int(py)] for px, py in polygon]}
    if mm_per_pixel:
        my, mx = mm_per_pixel
        found.update({"width_mm": round(w * mx, 2), "depth_mm": round(h * my, 2),
                      "area_mm2": round(found["area_px"] * mx * my, 2)})
    return found


def lesion_figures(scores: torch.Tensor, dice: torch.Tensor, iou: torch.Tensor, mask_status: list[str],
                   labels: torch.Tensor, classes, rule: dict | None = None, n_boot: int = 1000, seed: int = 0,
                   patients: list[str] | None = None, groups: list[str] | None = None) -> dict:
    """What the segmenter did on a labelled folder: Dice and IoU against the masks (mean over lesion images, with a
    95% bootstrap interval over patients when they are known, else images), the share of lesions it found (at the
    rule's lesion threshold, or any outline), and how well its lesion score separates normal scans from lesions
    (AUROC); with groups (e.g. scanners), the same per group. Images without a usable mask are left out of Dice and
    said so."""
    out = _lesion_block(scores, dice, iou, mask_status, labels, classes, rule, n_boot, seed, patients)
    if groups is not None:
        names = np.asarray(groups, dtype=object)
        out["per_group"] = {}
        for g in sorted(set(names.tolist())):
            idx = np.flatnonzero(names == g)
            out["per_group"][g] = _lesion_block(scores[idx], dice[idx], iou[idx], [mask_status[i] for i in idx],
                                                labels[idx], classes, rule, 300, seed,
                                                [patients[i] for i in idx] if patients else None)
    return out


def _lesion_block(scores, dice, iou, mask_status, labels, classes, rule, n_boot, seed, patients) -> dict:
    from .metrics import cluster_resamples  # evaluation only: predict, which outlines, never loads torchmetrics
    classes = list(classes)
    lesion_masks = np.array([s == "lesion" for s in mask_status])
    unusable = {s: mask_status.count(s) for s in ("missing", "size_mismatch", "unreadable", "all_lesion") if s in mask_status}
    out: dict = {"threshold": (rule or {}).get("lesion_threshold", LESION_LEVEL),
                 "threshold_from": "the model's lesion-first rule" if rule and "lesion_threshold" in rule
                 else f"any outline (probability >= {LESION_LEVEL})"}
    if lesion_masks.any():
        d, j = dice.numpy()[lesion_masks], iou.numpy()[lesion_masks]
        who = np.asarray(patients, dtype=object)[lesion_masks] if patients else np.arange(len(d))
        units = set(who.tolist())
        boots = ([float(d[pick].mean()) for pick in cluster_resamples(who, n_boot, seed)]
                 if len(units) >= TOO_FEW_UNITS else [])
        out.update({"n_lesion_masks": int(len(d)), "dice_mean": round(float(d.mean()), 4),
                    "dice_median": round(float(np.median(d)), 4),
                    "dice_ci": [round(float(np.quantile(boots, 0.025)), 4), round(float(np.quantile(boots, 0.975)), 4)]
                    if boots else None,
                    "dice_ci_method": (f"95% bootstrap over {len(units)} {'patients' if patients else 'images'}"
                                       if boots else f"too few: {len(units)} {'patients' if patients else 'images'}"),
                    "iou_mean": round(float(j.mean()), 4)})
    else:
        out["dice_note"] = ("no lesion masks in this folder: Dice and IoU need the expert's outline beside each image "
                            "(<name>_mask.png)")
    if unusable:
        out["masks_not_used"] = unusable
    lesion = torch.ones(len(labels), dtype=torch.bool)
    if "normal" in classes:
        lesion = labels != classes.index("normal")
    found = scores >= out["threshold"]
    if lesion.any():
        out["lesions_found"] = round(float(found[lesion].float().mean()), 4)
    if (~lesion).any():
        out["normal_scans_without_lesion"] = round(float((~found[~lesion]).float().mean()), 4)
    if lesion.any() and (~lesion).any():
        from sklearn.metrics import roc_auc_score
        out["normal_vs_lesion_auroc"] = round(float(roc_auc_score(lesion.numpy(), scores.numpy())), 4)
    out["n_images"] = int(len(labels))
    return out


def outlines_drawn(image: np.ndarray, prob_map: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """HxWx3 uint8 image with the model's outline (white) and, where known, the expert's (green) drawn on it."""
    out = image.copy()
    h, w = image.shape[:2]
    thick = max(1, round(min(h, w) / 150))
    if mask is not None and mask.any():
        expert = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(expert, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (0, 220, 0), thick, cv2.LINE_AA)
    found = outline(prob_map, h, w)
    if found:
        cv2.polylines(out, [np.asarray(found["polygon"], np.int32).reshape(-1, 1, 2)], True, (255, 255, 255), thick,
                      cv2.LINE_AA)
    return out
