"""busi finetune: a trained busi model trained on briefly with a hospital's own labelled images (all classes or some)."""
from __future__ import annotations

from pathlib import Path

from . import checkpoint
from .config import RunConfig, make_config

# Short and gentle: a few epochs at a tenth of the training learning rate, the recommended recipe's augmentation, the
# parent's probabilities kept as a second target (what it knows of classes the new images lack), a fifth of the
# images (grouped by patient and near-duplicates) kept aside to re-set the malignant threshold.
DEFAULTS = {
    "epochs": 8, "lr": 5e-5, "optimizer": "adamw", "weight_decay": 0.05, "scheduler": "cosine", "warmup_epochs": 0,
    "label_smoothing": 0.1, "max_rotation": 15.0, "min_scale": 0.7, "brightness": 0.1, "contrast": 0.15,
    "test_size": 0.0, "val_size": 0.2, "fit_temperature": False, "malignant_recall": 0.9, "distill_weight": 1.0,
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
