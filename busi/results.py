"""One model on one set of images -> a folder of results: metrics, predictions, calibration, plots, Grad-CAM."""
from __future__ import annotations

import csv
import itertools
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchmetrics.functional.classification import multiclass_roc

from .confidence import ece, nll, reliability_bins
from .data import Rows
from .errors import BusiError
from .metrics import compute_metrics, majority_baseline
from .operating import decide, describe, metrics_at
from .explain import gradcam, overlay, summarize_localization
from .inference import probabilities, run_model
from .lesion import LESION_LEVEL, dice_iou, lesion_figures, outlines_drawn
from .plots import confusion_matrix, gallery, reliability_diagram, roc_curves

GALLERY_SIZE = 8  # per kind (right, wrong) in gradcam.png
LOCALIZATION_SAMPLE = 32  # images with a lesion mask whose Grad-CAM the localisation figure is measured on (a
# backward pass each: 64 cost a tenth of a 300-image evaluate on two cores)


def _caption(path: str, classes, true: int, predicted: int, probability: float) -> str:
    """The image, its truth, the answer and the probability of that answer (not of the most probable class: at an
    operating point the two can differ)."""
    return f"{Path(path).name}\ntrue {classes[true]}, said {classes[predicted]} (p = {probability:.0%})"


def per_source(probs: torch.Tensor, labels: torch.Tensor, classes: list[str], sources: list[str],
               operating_point: dict | None = None, lesion_scores: torch.Tensor | None = None) -> dict:
    """The metrics of each source's images alone (a source may lack a class: its figures cover the classes it has)."""
    out = {}
    for name in sorted(set(sources)):
        idx = torch.tensor([i for i, s in enumerate(sources) if s == name])
        out[name] = compute_metrics(probs[idx], labels[idx], classes)
        if operating_point:
            out[name]["operating_point"] = metrics_at(probs[idx], labels[idx], classes, operating_point,
                                                      None if lesion_scores is None else lesion_scores[idx])
    return out


def write_results(folder: Path, model: nn.Module, config: dict, images: torch.Tensor, labels: torch.Tensor,
                  paths: list[str], masks: torch.Tensor | None = None, mask_status: list[str] | None = None,
                  extra: dict | None = None, explain: bool = True, logits: torch.Tensor | None = None,
                  sources: list[str] | None = None, shift_distances: torch.Tensor | None = None,
                  lesion_scores: torch.Tensor | None = None, lesion_dice: torch.Tensor | None = None,
                  lesion_maps: torch.Tensor | None = None, decision_scores: torch.Tensor | None = None) -> dict:
    """metrics.json, predictions.csv, confusion_matrix.png, misclassified.png, roc.png, calibration.png, gradcam.png.

    logits: the model's raw scores on images, when the caller has them already. sources: each image's source, when
    several folders were pooled: every figure is given per source too. shift_distances: each image's distance from the
    training images (busi.shift), written beside its prediction with the flag it earns. lesion_scores (models with a
    segmenter): each is written with its Dice against the image's mask, and the decision rule reads them, or
    decision_scores where given (inference.decision_scores: a flagged image counts as a lesion found)."""
    folder.mkdir(parents=True, exist_ok=True)
    classes = list(config["classes"])
    temperature = float(config.get("temperature", 1.0))
    if logits is None:
        said = run_model(model, config, {}, images)
        logits, lesion_scores, lesion_maps = said.logits, said.lesion_scores, said.lesion_maps
        if lesion_maps is not None and masks is not None and mask_status is not None:
            lesion_dice, iou = dice_iou(lesion_maps, masks, mask_status)
            extra = {**(extra or {}), "lesion": lesion_figures(lesion_scores, lesion_dice, iou, mask_status, labels,
                                                               classes, config.get("operating_point"))}
    decided_on = lesion_scores if decision_scores is None else decision_scores
    raw = torch.softmax(logits, 1)
    probs = probabilities(logits, config)
    metrics = {**compute_metrics(probs, labels, classes), "majority_baseline": round(majority_baseline(labels, len(classes)), 6)}
    metrics["calibration"] = {
        "temperature": round(temperature, 4), "bins": 15,
        "ece_before": round(ece(raw, labels), 4), "ece_after": round(ece(probs, labels), 4),
        "nll_before": round(nll(logits, labels), 4), "nll_after": round(nll(logits, labels, temperature), 4),
        "note": (f"before/after temperature scaling fitted on {config['temperature_fitted_on']} validation images "
                 "of the training data, never on these" if config.get("temperature_fitted_on")
                 else "no temperature fitted (fit_temperature: false, or no validation part): after = before"),
        "reliability": reliability_bins(probs, labels),
    }
    operating_point = config.get("operating_point")
    if operating_point:  # the figures above stay argmax ones, comparable across models; these are what users get
        metrics["operating_point"] = {**metrics_at(probs, labels, classes, operating_point, decided_on),
                                      "rule": describe(operating_point)}
    if sources is not None and len(set(sources)) > 1:
        metrics["per_source"] = per_source(probs, labels, classes, sources, operating_point, decided_on)
    predicted = decide(probs, classes, operating_point, decided_on)
    with open(folder / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        shifted = [] if shift_distances is None else ["shift_distance", "outside_training"]
        lesion = [] if lesion_scores is None else ["lesion_score", "lesion_dice"]
        w.writerow(["path", "true", "predicted", "predicted_argmax", *[f"p_{c}" for c in classes], *shifted, *lesion])
        for n, (p, t, y, pr) in enumerate(zip(paths, labels.tolist(), predicted.tolist(), probs.tolist())):
            flag = [] if shift_distances is None else [
                f"{float(shift_distances[n]):.4f}", int(shift_distances[n] > config["shift"]["threshold"])]
            found = [] if lesion_scores is None else [
                f"{float(lesion_scores[n]):.4f}",
                "" if lesion_dice is None or torch.isnan(lesion_dice[n]) else f"{float(lesion_dice[n]):.4f}"]
            w.writerow([p, classes[t], classes[y], classes[max(range(len(pr)), key=pr.__getitem__)],
                        *[f"{v:.6f}" for v in pr], *flag, *found])

    name = (extra or {}).get("model", config.get("arch", ""))
    # Every picture uses the decision rule users get (the operating point when there is one) and says which it is
    rule = "decisions at the operating point" if operating_point else "decisions by argmax"
    shown_metrics = metrics["operating_point"] if operating_point else metrics
    confusion_matrix(shown_metrics["confusion_matrix"], classes, folder / "confusion_matrix.png",
                     f"{name} (n={len(labels)}, accuracy {shown_metrics['accuracy']:.1%}; {rule})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fpr, tpr, _ = multiclass_roc(probs, labels, len(classes))
    roc_curves({c: (fpr[i].numpy(), tpr[i].numpy(), metrics["per_class"][c]["auroc"]) for i, c in enumerate(classes)},
               folder / "roc.png", f"{name}: ROC, one class vs the rest")
    reliability_diagram({"before temperature scaling": (reliability_bins(raw, labels), metrics["calibration"]["ece_before"]),
                         f"after (T = {temperature:.2f})": (metrics["calibration"]["reliability"], metrics["calibration"]["ece_after"])},
                        folder / "calibration.png")
    confidence = probs.gather(1, predicted[:, None])[:, 0]  # the probability of the answer given
    wrong = (predicted != labels).nonzero().flatten().tolist()
    wrong.sort(key=lambda i: -float(confidence[i]))  # most confident mistakes first: the worrying ones
    shown = wrong[:20]
    gallery([image.permute(1, 2, 0).numpy() for image in images[shown]],  # one batch: images may be data.Rows
            [_caption(paths[i], classes, labels[i], predicted[i], float(confidence[i])) for i in shown],
            folder / "misclassified.png", f"Misclassified, {rule}: the {len(shown)} most confident of {len(wrong)}")
    metrics["pictures"] = {"rule": rule, "misclassified": len(wrong), "misclassified_shown": len(shown)}
    if lesion_maps is not None:
        _lesion_gallery(folder, images, labels, predicted, paths, classes, lesion_maps, lesion_dice, masks, mask_status)

    if explain:
        try:
            against = None
            if lesion_maps is not None and not any(st == "lesion" for st in (mask_status or [])):
                # no expert masks here: the model's own outlines (where it found a lesion) say whether its heatmap
                # looked at the lesion it found; made only for the images the figure samples
                size = config["image_size"]
                masks = Rows(len(labels), lambda rows: (torch.nn.functional.interpolate(
                    lesion_maps[rows].float(), size=(size, size), mode="bilinear") >= LESION_LEVEL).to(torch.uint8))
                mask_status = ["lesion" if float(s) >= LESION_LEVEL else "empty" for s in lesion_scores]
                against = "the model's own lesion outlines (no expert masks in this folder)"
            _explain(folder, model, config, images, labels, predicted, confidence, paths, masks, mask_status, metrics,
                     rule)
            if against and "localization" in metrics:
                metrics["localization"]["against"] = against
        except BusiError as e:
            metrics["localization"] = {"error": str(e)}
    metrics.update(extra or {})
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _lesion_gallery(folder, images, labels, predicted, paths, classes, maps, dice, masks, mask_status) -> None:
    """lesions.png: the model's outline (white) beside the expert's (green): the worst Dice first, then the best, then
    normal scans (where an outline is a false alarm)."""
    known = {i for i, st in enumerate(mask_status or []) if st == "lesion" and dice is not None}
    by_dice = sorted(known, key=lambda i: float(dice[i]))
    normal = [i for i in range(len(labels)) if "normal" in classes and int(labels[i]) == classes.index("normal")]
    chosen = list(dict.fromkeys(by_dice[:6] + by_dice[::-1][:6] + normal[:3])) or list(range(min(12, len(labels))))
    # one batch each (images, maps and masks may be data.Rows: read again, or a model pass, for these images only)
    with_mask = [i for i in chosen if i in known] if masks is not None else []
    expert = dict(zip(with_mask, masks[with_mask])) if with_mask else {}
    drawn, captions = [], []
    for i, image, prob_map in zip(chosen, images[chosen], maps[chosen]):
        mask = expert[i][0].numpy().astype(bool) if i in expert else None
        drawn.append(outlines_drawn(image.permute(1, 2, 0).numpy(), prob_map[0].float().numpy(), mask))
        said = f"true {classes[int(labels[i])]}, said {classes[int(predicted[i])]}"
        captions.append(f"{Path(paths[i]).name}\n{said}" + (f", Dice {float(dice[i]):.2f}" if i in known else ""))
    gallery(drawn, captions, folder / "lesions.png", "Lesion outlines: the model's (white), the expert's (green); "
            "worst Dice first")


def _explain(folder, model, config, images, labels, predicted, confidence, paths, masks, mask_status, metrics, rule):
    classes = list(config["classes"])
    right = (predicted == labels).nonzero().flatten().tolist()
    by_class = [[i for i in right if labels[i] == c] for c in range(len(classes))]
    right = [i for batch in itertools.zip_longest(*by_class) for i in batch if i is not None]  # every class shown
    wrong = sorted((predicted != labels).nonzero().flatten().tolist(), key=lambda i: -float(confidence[i]))
    chosen = right[:GALLERY_SIZE] + wrong[:GALLERY_SIZE]
    # Localisation needs a heatmap per image with a lesion mask (a fixed sample of them: Grad-CAM costs a backward
    # pass per image, and a folder of thousands would wait minutes for one figure); the gallery only the chosen ones.
    with_lesion = [i for i, s in enumerate(mask_status or []) if s == "lesion"]
    n_masked = len(with_lesion)
    if n_masked > LOCALIZATION_SAMPLE:
        with_lesion = sorted(np.random.default_rng(0).choice(with_lesion, LOCALIZATION_SAMPLE, replace=False).tolist())
    needed = sorted(set(chosen) | set(with_lesion))
    batch = images[needed] if needed else None  # one batch (images may be data.Rows, read again for these only)
    needed_images = dict(zip(needed, batch)) if needed else {}
    heat = dict(zip(needed, gradcam(model, batch, predicted[needed].tolist(), config["mean"], config["std"]))) if needed else {}
    gallery([overlay(needed_images[i].permute(1, 2, 0).numpy(), heat[i]) for i in chosen],
            [_caption(paths[i], classes, labels[i], predicted[i], float(confidence[i])) for i in chosen],
            folder / "gradcam.png", f"Grad-CAM of the class said ({rule}): {len(right[:GALLERY_SIZE])} right, "
                                    f"{len(wrong[:GALLERY_SIZE])} wrong",
            colors=["darkgreen"] * len(right[:GALLERY_SIZE]) + ["darkred"] * len(wrong[:GALLERY_SIZE]))
    if masks is not None and mask_status is not None:
        metrics["localization"] = summarize_localization(
            np.stack([heat[i] for i in with_lesion]) if with_lesion else np.zeros((0, 1, 1)),
            [m[0].numpy().astype(bool) for m in masks[with_lesion]] if with_lesion else [],
            [int(labels[i]) for i in with_lesion],
            classes, mask_status)
        if n_masked > len(with_lesion):
            metrics["localization"]["sample"] = (f"Grad-CAM of a fixed random sample of {len(with_lesion)} of the "
                                                 f"{n_masked} images with a lesion mask")
