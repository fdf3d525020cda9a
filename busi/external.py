"""Another hospital's images: malignant-vs-benign figures with patient-level CIs, per-scanner metrics, a meta CSV."""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import torch

from .data import warn
from .errors import BusiError
from .meta import read_meta
from .operating import decide


TOO_FEW_IMAGES, TOO_FEW_CLUSTERS = 20, 10  # below either, an interval would be fiction: the report says "too few"


def _binary(probs: torch.Tensor, labels: torch.Tensor, classes, operating_point, lesion_scores=None) -> dict | None:
    """Score, truth and decisions of the malignant-vs-benign question, on the images that are one or the other."""
    if "malignant" not in classes or "benign" not in classes:
        return None
    mal, ben = list(classes).index("malignant"), list(classes).index("benign")
    keep = (labels == mal) | (labels == ben)
    p = probs[keep]
    score = p[:, mal] / (p[:, mal] + p[:, ben]).clamp_min(1e-12)  # the question asked, whatever else the model knows
    truth = (labels[keep] == mal).long()
    at = {"argmax": p.argmax(1) == mal}
    if operating_point:
        at["operating_point"] = decide(p, classes, operating_point,
                                       None if lesion_scores is None else lesion_scores[keep]) == mal
    return {"score": score, "truth": truth, "called": at, "keep": keep}


def _point(score, truth, called) -> dict:
    out = {"n": int(len(truth)), "n_malignant": int(truth.sum()), "auroc": None}
    if 0 < int(truth.sum()) < len(truth):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchmetrics.functional.classification import binary_auroc  # here: relabel is needed without it
            out["auroc"] = float(binary_auroc(score, truth))
    for name, c in called.items():
        pos, neg = truth == 1, truth == 0
        out[f"sensitivity_{name}"] = float(c[pos].float().mean()) if pos.any() else None
        out[f"specificity_{name}"] = float((~c[neg]).float().mean()) if neg.any() else None
    return out


def malignant_vs_benign(probs: torch.Tensor, labels: torch.Tensor, classes, operating_point: dict | None = None,
                        clusters: list | None = None, n_boot: int = 1000, seed: int = 0,
                        cluster_kind: str = "patients", lesion_scores: torch.Tensor | None = None) -> dict | None:
    """AUROC of p(malignant)/(p(malignant)+p(benign)) and sensitivity/specificity at argmax and at the operating point,
    with 95% percentile CIs from a bootstrap over clusters (patients when known, else images)."""
    from .metrics import cluster_resamples  # here: torchmetrics costs seconds, and relabel needs none of it
    b = _binary(probs, labels, classes, operating_point, lesion_scores)
    if b is None or len(b["truth"]) == 0:
        return None
    point = _point(b["score"], b["truth"], b["called"])
    ids = np.asarray(clusters, dtype=object)[b["keep"].numpy()] if clusters is not None else np.arange(len(b["truth"]))
    unique = np.unique(ids.astype(str))
    samples: dict[str, list[float]] = {}
    for pick in cluster_resamples(ids, n_boot, seed):  # n_boot 0: the point figures alone
        pick = torch.from_numpy(pick)
        boot = _point(b["score"][pick], b["truth"][pick], {k: v[pick] for k, v in b["called"].items()})
        for k, v in boot.items():
            if v is not None and not k.startswith("n"):
                samples.setdefault(k, []).append(v)
    too_few = point["n"] < TOO_FEW_IMAGES or len(unique) < TOO_FEW_CLUSTERS
    result = {"n": point["n"], "n_malignant": point["n_malignant"], "n_clusters": len(unique),
              "ci_method": f"95% percentile bootstrap over {cluster_kind if clusters is not None else 'images'} "
                           f"({n_boot} resamples)",
              "score": "p(malignant) / (p(malignant) + p(benign))", "too_few": too_few}
    if too_few:
        result["note"] = (f"too few to estimate: {point['n']} images of {len(unique)} clusters (an interval needs at least "
                          f"{TOO_FEW_IMAGES} images and {TOO_FEW_CLUSTERS} patients or groups); the figures are given "
                          "without one")
    for k, v in point.items():
        if k.startswith("n"):
            continue
        s = [] if too_few else samples.get(k, [])  # rounded once, here: every printed figure is this one
        result[k] = None if v is None else {"estimate": round(v, 6),
                                            "ci_low": round(float(np.quantile(s, 0.025)), 6) if s else None,
                                            "ci_high": round(float(np.quantile(s, 0.975)), 6) if s else None}
    return result


def per_group(probs: torch.Tensor, labels: torch.Tensor, classes, groups: list[str], operating_point: dict | None = None,
              clusters: list | None = None, lesion_scores: torch.Tensor | None = None) -> dict:
    """Every figure of malignant_vs_benign, and accuracy, for each group (scanner, site …)."""
    out = {}
    groups = np.asarray(groups, dtype=object)
    for g in sorted(set(groups.tolist())):
        idx = torch.from_numpy(np.flatnonzero(groups == g))
        sub = [clusters[i] for i in idx.tolist()] if clusters is not None else None
        out[g] = {"n": int(len(idx)),
                  "accuracy": round(float((decide(probs[idx], classes, None) == labels[idx]).float().mean()), 4),
                  "malignant_vs_benign": malignant_vs_benign(
                      probs[idx], labels[idx], classes, operating_point, sub, n_boot=300,
                      lesion_scores=None if lesion_scores is None else lesion_scores[idx])}
    return out


def relabel(dataset, classes, source: str):
    """The dataset with labels renumbered in the model's class order (it may hold a subset) -> (dataset, absent)."""
    from .checkpoint import check_classes
    absent = check_classes(source, {"classes": list(classes)}, dataset.classes)
    order = list(classes)
    samples = [dataclasses.replace(s, label=order.index(dataset.classes[s.label])) for s in dataset.samples]
    return dataclasses.replace(dataset, classes=tuple(order), samples=samples), absent


def load_external(cfg, classes, progress: bool = True) -> dict:
    """cfg.external decoded at the training size, labelled in the model's class order, with its meta rows."""
    from .data import load, scan
    dataset, absent = relabel(scan(cfg.external), classes, f"{cfg.external} (external)")
    images, labels, dataset = load(dataset, cfg.image_size, progress, cfg.preprocess)
    return {"images": images, "labels": labels, "dataset": dataset, "absent_classes": absent}


def fold_average(fold_probs: list[torch.Tensor], thresholds: list[float], external: dict, cfg,
                 classes) -> tuple[dict, torch.Tensor]:
    """The external figures of the fold models' averaged probabilities (one model per fold of cv: together they saw
    every training image), beside each fold model's own AUROC: what a model trained on this data does elsewhere.
    Returns (figures, the averaged probabilities)."""
    labels = external["labels"]
    per_fold = [malignant_vs_benign(p, labels, classes, n_boot=0) for p in fold_probs]
    op = None
    if thresholds:  # the folds' thresholds differ; their median applied to the averaged probabilities
        op = {"class": "malignant", "threshold": float(np.median(thresholds)), "note": "median of the folds' thresholds"}
    mean = torch.stack(fold_probs).mean(0)
    found = figures(mean, {"classes": list(classes), "operating_point": op}, labels, external["dataset"],
                    cfg.external_meta, cfg.external_id_column, cfg.external_group_column, cfg.external_patient_column)
    return {"data": str(cfg.external), "n": int(len(labels)), "absent_classes": external["absent_classes"],
            "method": f"probabilities averaged over the {len(fold_probs)} fold models", "operating_point": op,
            "fold_auroc_malignant_vs_benign": [None if f is None or f["auroc"] is None else f["auroc"]["estimate"]
                                               for f in per_fold], **found}, mean


def figures(probs, config, labels, dataset, meta, id_column, group_column, patient_column, lesion_scores=None) -> dict:
    """malignant_vs_benign (patient-level CIs when a patient column is given) and per_group, for metrics.json."""
    paths = [s.path for s in dataset.samples]
    rows = {}
    if meta:
        columns = [c for c in (group_column, patient_column) if c]
        rows, notes = read_meta(meta, id_column, columns, paths)
        for line in notes:
            warn(line)
    op = config.get("operating_point")
    patients = [rows.get(p, {}).get(patient_column) or f"image:{p}" for p in paths] if patient_column else None
    groups = [rows.get(p, {}).get(group_column) or "unknown" for p in paths] if group_column else None
    from .folders import header_info
    header = header_info(dataset)  # DICOM images name their patient and scanner themselves
    if header and patients is None and any("patient" in v for v in header.values()):
        patients = [header.get(p, {}).get("patient") or f"image:{p}" for p in paths]
    if header and groups is None and any("group" in v for v in header.values()):
        group_column = "scanner (DICOM header)"
        groups = [header.get(p, {}).get("group") or "unknown" for p in paths]
    out = {"malignant_vs_benign": malignant_vs_benign(probs, labels, config["classes"], op, patients,
                                                      lesion_scores=lesion_scores)}
    if groups is not None:
        out["group_column"] = group_column
        out["per_group"] = per_group(probs, labels, config["classes"], groups, op, patients, lesion_scores)
    return out
