"""Run configuration: one dataclass, read from YAML and flags, validated, saved beside every run's results."""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import BusiError


@dataclass
class RunConfig:
    """Everything that decides a train or cv run's numbers; the run folder's config.yaml reproduces it."""

    data: list[str] = field(default_factory=list)  # one folder, or several pooled as sources (--data A --data B)
    # CSV files with a row per image (e.g. BUS-BRA's bus_data.csv), matched by file name; with several sources each CSV
    # describes the source whose images it names. patient_column: a patient's images stay on one side of every split
    # and confidence intervals resample patients; group_column: figures per group (e.g. Device: per scanner)
    meta: list[str] = field(default_factory=list)
    id_column: str = "ID"
    patient_column: str | None = None
    group_column: str | None = None
    models: list[str] = field(default_factory=lambda: ["custom-cnn", "resnet50"])
    classes: list[str] | None = None  # None: every sub-folder of the data folder, in name order
    image_size: int = 224
    # split
    test_size: float = 0.3
    val_size: float = 0.1  # carved from the training part (grouped) for the temperature and threshold; never the test part
    fit_temperature: bool = True  # scale the logits by a temperature fitted on the validation part (Guo et al., 2017);
    # false keeps the network's own probabilities (better for a recipe whose cross-validated ECE the fit worsens)
    split: str = "grouped"  # "grouped" keeps near-duplicates on one side; "random" ignores them (leaky); "source" (cv
    # with several --data): each fold holds out one whole source, a hospital the model never saw
    seed: int = 0
    folds: int = 5
    repeats: int = 1
    # optimisation (the seed: Adam, cross-entropy, 25 epochs)
    epochs: int = 25
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"  # adam (the seed) or adamw
    scheduler: str = "none"  # none (the seed) or cosine (with linear warm-up)
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    class_weights: str = "none"  # none or balanced (inverse class frequency in the training part)
    mask_weight: float = 0.0  # > 0: also learn the lesion masks (where they exist): with lesion_size, the segmenter's
    # loss weight; without, a 1x1 head on the classifier's last feature map during training only
    # > 0: the model gets a lesion segmenter (EfficientNet-Lite0 + U-Net, busi.models.Segmenter) at this input size,
    # trained on every image whose mask is known (a normal scan's is empty); its outline decides 'normal' (busi.lesion)
    lesion_size: int = 0
    freeze_classifier: bool = False  # only the segmenter trains; the classifier stays as init_checkpoint (or ImageNet) made it
    mixup_alpha: float = 0.0  # > 0: blend pairs of training images and their labels (MixUp), Beta(alpha, alpha)
    cutmix_alpha: float = 0.0  # > 0: paste a box of one training image into another (CutMix); both > 0: one per batch
    tta: bool = False  # average the prediction of each image and its mirror image
    malignant_recall: float | None = None  # e.g. 0.9: call 'malignant' from the p(malignant) that reaches this recall
    # on the validation part (an operating point stored in the checkpoint); None: argmax
    ensemble: int = 1  # > 1: train this many copies (other seeds) and save them as one averaged model
    # cv only: every fold's model also scores this folder of another hospital (classes: a subset of the model's)
    external: str | None = None
    external_meta: str | None = None  # CSV with a row per external image, for patient-level CIs and per-group figures
    external_id_column: str = "ID"
    external_patient_column: str | None = None
    external_group_column: str | None = None
    # preprocessing of every image, in training and prediction (stored in the checkpoint): crop (to the scan region),
    # overlays (calipers and text painted out), clahe (adaptive histogram equalisation), pad (to a square, so that
    # resizing keeps the image's proportions); busi/preprocess.py
    preprocess: list[str] = field(default_factory=list)
    # a DICOM cine loop is one labelled image: its middle frame trains, or with "all" every frame does (each frame a
    # sample of its own, the loop's frames always on one side of a split: they are one patient and near-copies)
    cine_frames: str = "middle"
    # augmentation, drawn per image on whole batches
    flip_p: float = 0.5
    max_rotation: float = 10.0
    autocontrast_p: float = 0.5
    min_scale: float = 1.0  # < 1: random zoom-and-shift keeping at least this share of each side
    brightness: float = 0.0
    contrast: float = 0.0
    ultrasound_p: float = 0.0  # chance of each ultrasound-like change: speckle, gain (gamma), blur, depth attenuation
    # chance per training image with a lesion mask of a zoomed view instead: clear of the lesion (labelled normal) or
    # holding all of it (its own label); teaches 'normal' from every source with masks, not one hospital's look
    lesion_windows: float = 0.0
    # fine-tuning (busi finetune): start from this busi checkpoint's weights instead of ImageNet's; distill_weight > 0
    # keeps its probabilities on the new images near the parent's (what it knew of classes the new data lacks)
    init_checkpoint: str | None = None
    distill_weight: float = 0.0
    # weights
    pretrained: bool = True  # ImageNet weights for models that have them (resnet50)
    weights: str | None = None  # a local ImageNet state dict, for offline machines
    # hardware, passed to Lightning's Trainer
    accelerator: str = "auto"
    devices: str = "auto"
    precision: str = "auto"  # auto: bf16-mixed where the device computes bf16 natively, else 32-true (busi.hardware)
    channels_last: bool | str = "auto"  # NHWC memory layout; auto: on for CPU and CUDA, where it was measured faster
    strategy: str = "auto"
    num_nodes: int = 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
# busi.models.ARCHITECTURES' names, here too so that a config is checked without importing torch (a test keeps them equal)
MODEL_NAMES = ("custom-cnn", "resnet18", "resnet50", "efficientnet-lite0", "efficientnet-lite2")
PREPROCESS_STEPS = ("crop", "overlays", "clahe", "pad")  # busi.preprocess.STEPS (a test keeps them equal)
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
_HINTS = typing.get_type_hints(RunConfig)
SPLIT_SOURCE_TRAIN = ("--split source is for `busi cv` (each fold holds out one whole source); `busi train` with several "
                      "--data trains on all of them")


def _check_type(name: str, value, source: str):
    hint = _HINTS[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise BusiError(f"{source}: '{name}' must not be empty")
    if set(args) == {bool, str}:  # a switch that also takes "auto"
        if isinstance(value, bool) or value == "auto":
            return value
        raise BusiError(f"{source}: '{name}' must be true, false or auto, got {value!r}")
    base = next((a for a in args if a is not type(None)), hint) if isinstance(hint, types.UnionType) else hint
    origin = typing.get_origin(base)
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise BusiError(f"{source}: '{name}' must be a list of names, got {value!r}")
        return list(value)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is str and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # devices: 2
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise BusiError(f"{source}: '{name}' must be {base.__name__}, got {type(value).__name__} {value!r}")
    return value


def _validate(cfg: RunConfig, source: str) -> RunConfig:
    for m in cfg.models:
        if m not in MODEL_NAMES:
            raise BusiError(f"{source}: unknown model '{m}' (choose from {', '.join(MODEL_NAMES)})")
    if not cfg.models:
        raise BusiError(f"{source}: 'models' is empty")
    for step in cfg.preprocess:
        if step not in PREPROCESS_STEPS:
            raise BusiError(f"{source}: unknown preprocess step '{step}' (choose from {', '.join(PREPROCESS_STEPS)})")
    checks = [
        (0 <= cfg.test_size < 1, "'test_size' must be in [0, 1) (0: train on every image, test with `busi evaluate`)"),
        (0 <= cfg.val_size < 1, "'val_size' must be in [0, 1)"),
        (cfg.split in ("grouped", "random", "source"), "'split' must be 'grouped', 'random' or 'source'"),
        (cfg.cine_frames in ("middle", "all"), "'cine_frames' must be 'middle' or 'all'"),
        (cfg.image_size >= 32, "'image_size' must be at least 32"),
        (cfg.epochs >= 1, "'epochs' must be at least 1"),
        (cfg.batch_size >= 1, "'batch_size' must be at least 1"),
        (cfg.lr > 0, "'lr' must be positive"),
        (cfg.folds >= 2, "'folds' must be at least 2"),
        (cfg.repeats >= 1, "'repeats' must be at least 1"),
        (0 <= cfg.flip_p <= 1 and 0 <= cfg.autocontrast_p <= 1 and 0 <= cfg.ultrasound_p <= 1
         and 0 <= cfg.lesion_windows <= 1,
         "probabilities must be in [0, 1]"),
        (cfg.num_nodes >= 1, "'num_nodes' must be at least 1"),
        (cfg.precision in PRECISIONS, f"'precision' must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}"),
        (cfg.optimizer in ("adam", "adamw"), "'optimizer' must be adam or adamw"),
        (cfg.scheduler in ("none", "cosine"), "'scheduler' must be none or cosine"),
        (cfg.class_weights in ("none", "balanced"), "'class_weights' must be none or balanced"),
        (0 < cfg.min_scale <= 1, "'min_scale' must be in (0, 1]"),
        (0 <= cfg.label_smoothing < 1, "'label_smoothing' must be in [0, 1)"),
        (cfg.mask_weight >= 0, "'mask_weight' must be at least 0"),
        (cfg.lesion_size == 0 or cfg.lesion_size >= 64, "'lesion_size' must be 0 (no segmenter) or at least 64"),
        (cfg.lesion_size == 0 or cfg.mask_weight > 0, "'lesion_size' needs 'mask_weight' > 0 (the segmenter's loss)"),
        (not cfg.freeze_classifier or cfg.lesion_size, "'freeze_classifier' needs 'lesion_size' (the segmenter to train)"),
        (cfg.distill_weight >= 0, "'distill_weight' must be at least 0"),
        (cfg.distill_weight == 0 or cfg.init_checkpoint, "'distill_weight' needs 'init_checkpoint' (the model to keep near)"),
        (cfg.ensemble >= 1, "'ensemble' must be at least 1"),
        (cfg.malignant_recall is None or 0 < cfg.malignant_recall <= 1, "'malignant_recall' must be in (0, 1]"),
        (cfg.malignant_recall is None or cfg.val_size > 0,
         "'malignant_recall' needs a validation part to set its threshold on ('val_size' > 0)"),
        (not (cfg.patient_column or cfg.group_column) or cfg.meta, "'patient_column' and 'group_column' need 'meta'"),
        (not (cfg.external_patient_column or cfg.external_group_column) or cfg.external_meta,
         "'external_patient_column' and 'external_group_column' need 'external_meta'"),
        (cfg.mixup_alpha >= 0 and cfg.cutmix_alpha >= 0, "'mixup_alpha' and 'cutmix_alpha' must be at least 0"),
        (cfg.mask_weight == 0 or cfg.mixup_alpha == cfg.cutmix_alpha == 0,
         "'mask_weight' cannot be combined with 'mixup_alpha' or 'cutmix_alpha' (a blended image has no one lesion mask)"),
    ]
    for ok, message in checks:
        if not ok:
            raise BusiError(f"{source}: {message}")
    return cfg


def make_config(overrides: dict | None = None, config_file: str | Path | None = None, base: dict | None = None,
                fixed: dict | None = None, fixed_why: str = "") -> RunConfig:
    """Defaults (RunConfig's, then base), then the YAML file, then explicit overrides (flags); unknown keys and wrong
    types are errors. fixed: values no layer may contradict (fixed_why says why, in the error)."""
    values: dict = {}
    layers = [("defaults", base)] if base else []
    if config_file is not None:
        path = Path(config_file)
        try:
            loaded = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise BusiError(f"{path}: config file does not exist") from None
        except yaml.YAMLError as e:
            raise BusiError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise BusiError(f"{path}: a config file must be a mapping of keys to values")
        layers.append((str(path), loaded))
    layers.append(("command line", overrides or {}))
    for source, layer in layers:
        for key, value in layer.items():
            if key not in FIELDS:
                close = difflib.get_close_matches(str(key), list(FIELDS), n=1, cutoff=0.6)
                hint = f"did you mean '{close[0]}'?" if close else "the keys are listed in busi/config.py's RunConfig"
                raise BusiError(f"{source}: unknown config key '{key}' ({hint})")
            values[key] = _check_type(key, value, source)
            if fixed and key in fixed and values[key] != fixed[key] and source != "defaults":
                flag = f"--{key.replace('_', '-')}" if source == "command line" else f"'{key}'"
                raise BusiError(f"{source}: {flag} {value} cannot apply: {fixed_why}'{key}' is {fixed[key]}")
    values.update(fixed or {})
    source = str(config_file) if config_file is not None else "command line"
    return _validate(RunConfig(**values), source)


def cautions(cfg: RunConfig) -> list[str]:
    """Settings that run but rarely do what was meant: one line each, printed before training."""
    out = []
    if cfg.scheduler == "cosine" and cfg.warmup_epochs > 0 and cfg.warmup_epochs >= cfg.epochs:
        out.append(f"warmup_epochs {cfg.warmup_epochs} >= epochs {cfg.epochs}: the whole run is the warm-up, the learning "
                   f"rate never reaches {cfg.lr:g} and the model learns little; raise --epochs or lower warmup_epochs")
    return out


def save_config(cfg: RunConfig, path: Path, extra: dict | None = None) -> None:
    data = cfg.to_dict()
    if extra:
        data = {**data, **extra}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
