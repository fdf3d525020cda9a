"""busi finetune: a trained busi model trained on briefly with a hospital's own labelled images (all classes or some)."""
from __future__ import annotations

from pathlib import Path

from . import checkpoint
from .config import RunConfig, make_config

# Short and gentle: a few epochs at a tenth of the training learning rate, the recommended recipe's augmentation, the
# parent's probabilities kept as a second target (what it knows of classes the new images lack), a tenth of the
# images (grouped by patient and near-duplicates) kept aside for the shift warning. The decision rule is not set on
# that slice: cross_fitted_rule sets it on every image, from models tuned without it.
DEFAULTS = {
    "epochs": 8, "lr": 5e-5, "optimizer": "adamw", "weight_decay": 0.05, "scheduler": "cosine", "warmup_epochs": 0,
    "label_smoothing": 0.1, "max_rotation": 15.0, "min_scale": 0.7, "brightness": 0.1, "contrast": 0.15,
    "test_size": 0.0, "val_size": 0.1, "fit_temperature": False, "malignant_recall": 0.9, "distill_weight": 1.0,
    "batch_size": 32,
}


def finetune_config(parent: str | Path, overrides: dict | None = None, config_file: str | Path | None = None) -> RunConfig:
    """DEFAULTS, then the YAML file and flags; the architecture, input size, preprocessing and test-time augmentation
    are the parent's (a file or flag that contradicts them is an error)."""
    config = checkpoint.read(parent)["config"]
    fixed = {"models": [config["arch"]], "image_size": config["image_size"],
             "preprocess": list(config.get("preprocess", [])), "tta": bool(config.get("tta", False)),
             "init_checkpoint": str(parent)}
    base = dict(DEFAULTS)
    if config.get("lesion_size"):  # its segmenter trains on with the masks the folder has
        fixed["lesion_size"] = int(config["lesion_size"])
        base["mask_weight"] = 1.0
    return make_config(overrides, config_file, base=base, fixed=fixed,
                       fixed_why=f"fine-tuning keeps what {Path(parent).name} was trained with: ")


CROSS_FIT_FOLDS = 2  # halves of the adapt images, each tuned on one and judged on the other: 1x the training once more


def cross_fitted_rule(cfg: RunConfig, folder: Path, progress: bool = True) -> dict:
    """The tuned model's decision rule, fitted on every adapt image rather than on its validation slice: the images are
    cut in CROSS_FIT_FOLDS parts by patient and near-duplicates (stratified); a model is tuned the same way on the other
    parts and scores each part, so every image gets a prediction from a tuned model that never saw it. On those
    out-of-fold predictions the rule is fitted as `busi calibrate` fits it (the lesion-first rule jointly, else the
    malignant threshold) and the recall it promises is measured the same way (cross-fitted over patients, with its
    interval). The run folder's checkpoint gets that rule; cross_fit.json keeps what it was fitted on."""
    import json
    from dataclasses import replace

    import numpy as np
    import torch

    from . import hardware
    from .data import load_masks
    from .errors import BusiError
    from .inference import outputs_of, probabilities
    from .lesion import lesion_scores
    from .models import normalization
    from .operating import FAMILIAR_ONLY, LESION_FIRST, MIN_POSITIVES, cross_fitted, fit_joint_rule, fit_with_ci
    from .split import group_ids, kfold
    from .workflow import prepare, train_one, training_tensors
    path = folder / cfg.models[0] / "checkpoint.pth"
    final = checkpoint.read(path)["config"]
    parent_rule = checkpoint.read(cfg.init_checkpoint)["config"].get("operating_point") or {}
    if cfg.malignant_recall is None:
        return {}
    cfg, _ = hardware.resolve(replace(cfg, val_size=0.0))
    dataset, report, images, labels, _ = prepare(cfg, False)
    classes = list(dataset.classes)
    if "malignant" not in classes or int((labels == classes.index("malignant")).sum()) < MIN_POSITIVES:
        return {}  # too few cancers to set a rule on: the run keeps what train set (or its parent's), and said so
    paths = [s.path for s in dataset.samples]
    groups = group_ids(paths, report["duplicate_groups"], dataset.patient_groups())
    masks, status = load_masks(dataset, cfg.image_size, cfg.preprocess, report=False)
    part = training_tensors(cfg, images, labels, masks, status)
    probs = torch.zeros(len(paths), len(classes))
    scores = torch.full((len(paths),), float("nan"))
    for k, (train_idx, test_idx) in enumerate(kfold(labels.numpy(), groups, CROSS_FIT_FOLDS, cfg.seed)):
        if progress:
            print(f"busi: cross-fitting the rule, part {k + 1} of {CROSS_FIT_FOLDS}: tuned on {len(train_idx)} images, "
                  f"judged on {len(test_idx)}", flush=True)
        model, config, _, _ = train_one(cfg.models[0], cfg, dataset.classes, part, train_idx, np.array([], dtype=int),
                                        folder / "cross_fit" / f"part{k}", progress=False, checkpoints=False,
                                        shift_summary=False)
        logits, maps = outputs_of(model, images[test_idx], *normalization(cfg.models[0]), tta=cfg.tta)
        probs[test_idx] = probabilities(logits, config)
        if maps is not None:
            scores[test_idx] = lesion_scores(maps)
    patients = [str(g) for g in groups]
    where = (f"out-of-fold predictions of {len(paths)} images of {', '.join(map(str, cfg.data))} (models tuned the same "
             f"way on {CROSS_FIT_FOLDS - 1} of {CROSS_FIT_FOLDS} parts of them, by patient)")
    if parent_rule.get("rule") == LESION_FIRST and not torch.isnan(scores).any():
        normals = int((labels == classes.index("normal")).sum()) if "normal" in classes else 0
        fit = {"max_lesions_called_normal": parent_rule.get("max_lesions_called_normal", 0.1),
               "lesion_threshold": None if normals >= MIN_POSITIVES else parent_rule["lesion_threshold"]}
        rule = fit_joint_rule(probs, scores, labels, classes, cfg.malignant_recall, where=where, **fit)
        if parent_rule.get(FAMILIAR_ONLY):  # tuned on this hospital's images, which it then knows: the guard stays
            rule[FAMILIAR_ONLY] = True
        promise = cross_fitted(probs, scores, labels, classes, cfg.malignant_recall, patients, **fit)
        rule.update({"recall_where_fitted": rule["where_fitted"]["malignant_recall"], "cross_fitted": promise,
                     "expected_recall": promise["malignant_recall"], "recall_ci": promise["recall_ci"],
                     "ci_method": promise["ci_method"]})
    else:
        try:
            rule = fit_with_ci(probs, labels, classes, cfg.malignant_recall, patients, where=where)
        except BusiError:
            return {}
        rule["fitted_where"] = where
    model, config, extras = checkpoint.load(path, extras=True)
    config["operating_point"] = {**rule, "cross_fit_folds": CROSS_FIT_FOLDS}
    checkpoint.save(path, model, config, extras=extras)
    record = {"folds": CROSS_FIT_FOLDS, "images": len(paths), "replaced": final.get("operating_point"),
              "operating_point": config["operating_point"],
              "predictions": [{"path": p, **{f"p_{c}": round(float(v), 6) for c, v in zip(classes, probs[i])},
                               **({"lesion_score": round(float(scores[i]), 5)} if not torch.isnan(scores[i]) else {}),
                               "true": classes[int(labels[i])]} for i, p in enumerate(paths)]}
    (folder / "cross_fit.json").write_text(json.dumps(record, indent=2) + "\n")
    return config["operating_point"]
