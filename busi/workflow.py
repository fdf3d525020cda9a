"""What each subcommand does, as plain functions that fill a run folder (the CLI only parses and calls these)."""
from __future__ import annotations

import csv
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml
from PIL import Image
from tqdm.auto import tqdm

from . import __version__, checkpoint, hardware, preprocess
from .audit import audit, near_duplicates_across
from .config import RunConfig, save_config
from .data import (IMAGE_SUFFIXES, MASK_NAME, MASK_USABLE, Dataset, load, load_masks,
                   model_input, read_image, scan, warn)
from .folders import scan_sources
from .calibrate import fit_temperature
from .evaluate import compute_metrics
from .operating import decide, fit_threshold
from .errors import BusiError
from .export import ExportedModel, is_exported
from .models import IMAGENET_WEIGHTS, Ensemble, build, count_parameters, normalization
from .plots import loss_curves
from .report import render
from .results import write_results
from .split import group_ids, train_test
from .train import check_hardware, checkpoint_logits, fit, logits_of


def is_main_process() -> bool:
    """False in the extra processes of a distributed run (Lightning DDP, torchrun, SLURM): they train but never write."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def run_dir(out: str | Path | None, name: str, overwrite: bool = False, resume: bool = False) -> Path:
    """The run folder: --out, or runs/<timestamp>-<name>; a folder already holding files is refused."""
    if not is_main_process():  # rank 0 checks and writes the folder; the others only need its name
        if os.environ.get("BUSI_RUN_DIR"):
            return Path(os.environ["BUSI_RUN_DIR"])
        if out:
            return Path(out)
        raise BusiError("a run started by torchrun or srun needs --out, so that every process agrees on the run folder")
    path = Path(out) if out else Path("runs") / f"{datetime.now():%Y-%m-%dT%H%M%S}-{name}"
    if path.exists() and not path.is_dir():
        raise BusiError(f"{path}: --out exists and is not a folder")
    if path.exists() and any(path.iterdir()) and not (overwrite or resume):
        raise BusiError(f"{path}: already holds a run; pass --overwrite to write over it, or choose another --out")
    return path


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2))


def run_audit(data: str | Path, out: str | Path | None = None, classes=None, overwrite: bool = False,
              progress: bool = True) -> tuple[dict, Path]:
    dataset = scan(data, classes)
    folder = run_dir(out, "audit", overwrite)
    result = audit(dataset, progress=progress)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "audit.json", result)
    return result, folder


def prepare(cfg: RunConfig, progress: bool = True, notes: list[str] = ()) -> tuple[Dataset, dict, torch.Tensor, torch.Tensor, list[str]]:
    """Scan, audit, leave out label conflicts and unreadable files, decode the rest once into memory.

    notes (the hardware choice) are printed once the folder is known to be there, so a bad --data stays one line.
    """
    dataset = scan_sources(cfg.data, cfg.classes)
    hardware.announce(notes)
    report = audit(dataset, progress=progress)
    if dataset.sources:
        report["sources"] = {name: str(root.resolve()) for name, root in dataset.sources.items()}
        for group in report["duplicate_groups"]:
            names = sorted({p.split("/", 1)[0] for p in group})
            if len(names) > 1:  # one clear line each: a hospital's set that holds BUSI images, say
                warn(f"the same scan is in sources {' and '.join(names)} ({', '.join(group)}): kept on one side of "
                     "every split" + (", left out (their labels differ)" if group in report["label_conflicts"] else ""))
    conflicted = sorted({p for g in report["label_conflicts"] for p in g})
    left_out = set(conflicted) | set(report["skipped"])
    usable = [s for s in dataset.samples if s.path not in left_out]
    for s in dataset.samples:
        if s.path in report["skipped"]:  # unreadable images (stray files were reported by scan already)
            warn(f"skipping {report['skipped'][s.path]}")
    images, labels, kept = load(dataset.with_samples(usable, report["skipped"]), cfg.image_size, progress,
                                 cfg.preprocess)
    for c, n in kept.counts().items():
        if n == 0:
            raise BusiError(f"{dataset.root / c}: no usable images left in this class")
    if kept.sources:
        counts = ", ".join(f"{name} {sum(kept.source_of(s) == name for s in kept.samples)}" for name in kept.sources)
        print(f"busi: pooling {len(kept.sources)} sources: {counts} images", file=sys.stderr, flush=True)
    return kept, report, images, labels, conflicted


def training_tensors(cfg: RunConfig, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, status: list[str]):
    """index -> the tensors fit() trains on: images and labels, plus lesion masks when the recipe learns them."""
    if cfg.mask_weight <= 0:
        return lambda idx: (images[idx], labels[idx])
    known = torch.tensor([st in MASK_USABLE for st in status])
    return lambda idx: (images[idx], labels[idx], masks[idx], known[idx])


def build_for(arch: str, cfg: RunConfig, n_classes: int):
    """A fresh model as cfg wants it: ImageNet weights (downloaded or --weights) for the models that have them."""
    return build(arch, n_classes, pretrained=cfg.pretrained and arch in IMAGENET_WEIGHTS,
                 weights=cfg.weights if arch in IMAGENET_WEIGHTS else None)


def train_one(arch: str, cfg: RunConfig, classes, part, train_idx, val_idx, out_dir: Path, test_idx=None,
              resume: bool = False, progress: bool = True, checkpoints: bool = True, seed: int | None = None):
    """Build, seed and train one model; calibrate it on the validation part. -> (model, config, history)."""
    start = time.perf_counter()
    val = part(val_idx)[:2] if len(val_idx) else None
    test = part(test_idx)[:2] if test_idx is not None else None
    members, histories = [], []
    for k in range(cfg.ensemble):  # an ensemble's members differ only by seed: initial weights, order, augmentation
        L.seed_everything((cfg.seed if seed is None else seed) + 7919 * k, verbose=False)
        member, history = fit(build_for(arch, cfg, len(classes)), cfg, part(train_idx),
                              out_dir / f"member{k}" if cfg.ensemble > 1 else out_dir, val=val, test=test, resume=resume,
                              progress=progress, checkpoints=checkpoints, normalization=normalization(arch))
        members.append(member)
        histories.append(history)
    model, history = members[0], histories[0]
    if cfg.ensemble > 1:
        model = Ensemble(members).eval()
        history = [{"member": k, **row} for k, h in enumerate(histories) for row in h]
        if is_main_process():  # one history.csv for the model, a row per member and epoch
            with open(out_dir / "history.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(history[0]))
                writer.writeheader()
                writer.writerows(history)
    config = _checkpoint_config(arch, cfg, classes)
    config["members"] = cfg.ensemble
    config["train_seconds"] = round(time.perf_counter() - start, 1)
    if val is not None:
        calibrate(model, config, cfg, val)
    return model, config, history


def calibrate(model, config: dict, cfg: RunConfig, val) -> None:
    """On the validation part (images, labels): the temperature (if cfg fits one) and the malignant threshold."""
    val_logits = logits_of(model, val[0], config["mean"], config["std"], tta=cfg.tta)
    config["temperature"] = fit_temperature(val_logits, val[1]) if cfg.fit_temperature else 1.0
    config["temperature_fitted_on"] = len(val[1]) if cfg.fit_temperature else 0
    if cfg.malignant_recall is not None:
        config["operating_point"] = fit_threshold(torch.softmax(val_logits / config["temperature"], 1), val[1],
                                                  list(config["classes"]), cfg.malignant_recall)


def _checkpoint_config(arch: str, cfg: RunConfig, classes) -> dict:
    mean, std = normalization(arch)
    roots = [str(Path(d).resolve()) for d in cfg.data]
    return {"arch": arch, "classes": list(classes), "image_size": cfg.image_size, "mean": list(mean),
            "std": list(std), "preprocess": list(cfg.preprocess), "trained_on": roots if len(roots) > 1 else roots[0],
            "trained_at": datetime.now().isoformat(timespec="seconds"),
            "seed": cfg.seed, "epochs": cfg.epochs, "tta": cfg.tta, "temperature": 1.0, "version": __version__}


def check_models(cfg: RunConfig, n_classes: int) -> None:
    """Build every model once before training any, so a missing weight file fails in seconds, not after an hour."""
    for arch in cfg.models:
        build_for(arch, cfg, n_classes)


def run_finished(out: str | Path | None, cfg: RunConfig) -> bool:
    """True when --out holds a run that trained every model for cfg.epochs and wrote its report (the last step);
    a finished run resumed with more --epochs is not finished: it trains on."""
    if not out:
        raise BusiError("--resume needs --out: the folder of the run to continue")
    folder = Path(out)
    if not (folder / "config.yaml").is_file():
        raise BusiError(f"{folder}: nothing to resume (no run was started in this folder)")
    done = yaml.safe_load((folder / "config.yaml").read_text()).get("epochs", 0) >= cfg.epochs
    return done and (folder / "report.html").is_file() and all((folder / m / "checkpoint.pth").is_file() for m in cfg.models)


def run_train(cfg: RunConfig, out: str | Path | None = None, overwrite: bool = False, resume: bool = False,
              progress: bool = True) -> Path:
    """Audit, split (grouped, stratified, seeded), train every model in cfg.models, evaluate on the test part."""
    folder = run_dir(out, "-".join(cfg.models), overwrite, resume)
    main = is_main_process()
    cfg, notes = hardware.resolve(cfg)
    check_hardware(cfg)
    os.environ["BUSI_RUN_DIR"] = str(folder.resolve())  # inherited by DDP worker processes Lightning starts
    progress = progress and main
    dataset, report, images, labels, conflicted = prepare(cfg, progress, notes if main else [])
    check_models(cfg, len(dataset.classes))
    paths = [s.path for s in dataset.samples]
    grouped = cfg.split == "grouped"
    groups = group_ids(paths, report["duplicate_groups"]) if grouped else np.arange(len(paths))
    sources = [dataset.source_of(s) for s in dataset.samples]
    source_arr = np.asarray(sources)
    if cfg.test_size > 0:
        train_idx, test_idx = train_test(labels.numpy(), groups, cfg.test_size, cfg.seed, grouped, sources)
    else:  # every image trains; the test is a folder the model never saw, with `busi evaluate`
        train_idx, test_idx = np.arange(len(paths)), np.array([], dtype=int)
    val_idx = np.array([], dtype=int)
    if cfg.val_size > 0:
        sub_train, sub_val = train_test(labels[train_idx].numpy(), groups[train_idx], cfg.val_size, cfg.seed, grouped,
                                        source_arr[train_idx])
        train_idx, val_idx = train_idx[sub_train], train_idx[sub_val]

    if main:
        _write_run_files(folder, cfg, report, {
            "seed": cfg.seed, "test_size": cfg.test_size, "val_size": cfg.val_size, "split": cfg.split,
            "classes": list(dataset.classes),
            "train": [paths[i] for i in train_idx], "val": [paths[i] for i in val_idx], "test": [paths[i] for i in test_idx],
            "left_out_label_conflicts": conflicted, "skipped": dataset.skipped})
    masks, status = load_masks(dataset, cfg.image_size, cfg.preprocess)
    part = training_tensors(cfg, images, labels, masks, status)
    histories, rows = {}, []
    for arch in cfg.models:
        model, config, history = train_one(arch, cfg, dataset.classes, part, train_idx, val_idx, folder / arch,
                                           test_idx=test_idx if len(test_idx) else None, resume=resume, progress=progress)
        if not main:
            continue
        if cfg.ensemble > 1:  # a curve per member
            histories.update({f"{arch} member {k}": [r for r in history if r["member"] == k] for k in range(cfg.ensemble)})
        else:
            histories[arch] = history
        checkpoint.save(folder / arch / "checkpoint.pth", model, config)
        if len(test_idx) == 0:
            continue
        rows.append(write_results(folder / arch, model, config, images[test_idx], labels[test_idx],
                                  [paths[i] for i in test_idx], masks[test_idx], [status[i] for i in test_idx],
                                  {"model": arch, "parameters": count_parameters(model), "epochs": cfg.epochs,
                                   "train_seconds": config["train_seconds"], "n_train": len(train_idx), "n_val": len(val_idx)},
                                  sources=[sources[i] for i in test_idx]))
    if main:
        loss_curves(histories, folder / "loss.png")
        write_summary(folder, rows, list(dataset.classes))
        render(folder)
    return folder


def _write_run_files(folder: Path, cfg: RunConfig, report: dict, split: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_config(cfg, folder / "config.yaml", {"busi_version": __version__, "command": "train"})
    _write_json(folder / "audit.json", report)
    _write_json(folder / "split.json", split)


SUMMARY_COLUMNS = ["model", "parameters", "epochs", "train_seconds", "n", "accuracy", "macro_precision", "macro_recall",
                   "macro_f1", "auroc", "majority_baseline"]


def write_summary(folder: Path, rows: list[dict], classes: list[str]) -> None:
    """summary.csv for machines and summary.md for people: one row per model."""
    if not rows:
        (folder / "summary.md").write_text(
            "No test part (test_size 0): every usable image trained the model(s). Measure them on images they never "
            "saw: `busi evaluate --checkpoint RUN/MODEL/checkpoint.pth --data HELDOUT`.\n")
        return
    columns = SUMMARY_COLUMNS + [f"recall_{c}" for c in classes]
    flat = [{**{k: r.get(k) for k in SUMMARY_COLUMNS}, **{f"recall_{c}": r["per_class"][c]["recall"] for c in classes}}
            for r in rows]
    with open(folder / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(flat)
    fmt = lambda v: "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in flat]
    (folder / "summary.md").write_text("\n".join(lines) + "\n")


def training_overlap(checkpoint_path: str | Path, config: dict, dataset: Dataset, train_data: str | Path | None = None,
                     progress: bool = True) -> dict:
    """Which images of dataset have a near-duplicate among the images the checkpoint's model trained on."""
    if train_data is not None and not Path(train_data).is_dir():
        raise BusiError(f"{train_data}: --train-data folder does not exist")
    given = train_data or config.get("trained_on")
    roots = given if isinstance(given, list) else [given] if given else []  # a list: several sources pooled
    if not roots or not all(Path(r).is_dir() for r in roots):
        return {"checked": False, "note": f"training data '{given}' is not here: pass --train-data DIR to check"}
    reference = scan_sources(roots, config["classes"])
    split = Path(checkpoint_path).parent.parent / "split.json"
    if split.is_file():  # only what trained the model (training and validation part), not its own test part
        parts = json.loads(split.read_text())
        used = set(parts["train"]) | set(parts["val"])
        if used <= {s.path for s in reference.samples}:
            reference = reference.with_samples([s for s in reference.samples if s.path in used])
    seen = near_duplicates_across(reference, dataset, progress)
    return {"checked": True, "training_data": [str(Path(r).resolve()) for r in roots] if len(roots) > 1 else
            str(Path(roots[0]).resolve()), "n_training_images": len(reference.samples),
            "n_with_near_duplicate_in_training": len(seen), "near_duplicates": seen}


def run_evaluate(checkpoint_path: str | Path, data: str | Path, out: str | Path | None = None, overwrite: bool = False,
                 progress: bool = True, train_data: str | Path | None = None, meta: str | Path | None = None,
                 id_column: str = "ID", group_column: str | None = None, patient_column: str | None = None
                 ) -> tuple[dict, Path]:
    """Evaluate a saved model on every readable image of a folder, and again without the images it has seen copies of.

    The folder may hold a subset of the model's classes (another hospital's benign/malignant set); a meta CSV adds
    per-group figures (e.g. per scanner) and a bootstrap over patients instead of images.
    """
    if (group_column or patient_column) and not meta:
        raise BusiError("--group-column and --patient-column need --meta FILE.csv")
    model, config = checkpoint.load(checkpoint_path)
    from .external import figures, relabel
    # labels re-numbered in the model's class order, so every figure speaks of the model's classes
    dataset, absent = relabel(scan(data), config["classes"], str(checkpoint_path))
    folder = run_dir(out, f"evaluate-{config['arch']}", overwrite)
    steps = config.get("preprocess", ())
    images, labels, dataset = load(dataset, config["image_size"], progress, steps)
    masks, status = load_masks(dataset, config["image_size"], steps)
    overlap = training_overlap(checkpoint_path, config, dataset, train_data, progress)
    logits = checkpoint_logits(model, images, config)  # once, for the overlap, the external figures and write_results
    probs = torch.softmax(logits / float(config.get("temperature", 1.0)), 1)
    if overlap["checked"] and overlap["near_duplicates"]:
        unseen = [i for i, s in enumerate(dataset.samples) if s.path not in overlap["near_duplicates"]]
        if unseen:
            m = compute_metrics(probs[unseen], labels[unseen], config["classes"])
            overlap["metrics_without_them"] = {"n": m["n"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                                               "auroc": m["auroc"],
                                               "recall": {c: v["recall"] for c, v in m["per_class"].items()}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"command": "evaluate", "checkpoint": str(checkpoint_path),
                                                     "data": str(data), "busi_version": __version__}, sort_keys=False))
    extra = {"model": config["arch"], "checkpoint": str(checkpoint_path), "skipped": dataset.skipped,
             "training_overlap": overlap, **figures(probs, config, labels, dataset, meta, id_column, group_column,
                                                    patient_column)}
    metrics = write_results(folder, model, config, images, labels, [s.path for s in dataset.samples], masks, status, extra,
                            logits=logits)
    render(folder)
    return metrics, folder


def operating_point_of(model_path: str | Path) -> dict | None:
    """The decision threshold stored with a checkpoint or an exported model (None: argmax)."""
    config = ExportedModel(model_path).config if is_exported(model_path) else checkpoint.read(model_path)["config"]
    return config.get("operating_point")


def predict_probs(model, config: dict, images: torch.Tensor) -> torch.Tensor:
    logits = checkpoint_logits(model, images, config)
    return torch.softmax(logits / float(config.get("temperature", 1.0)), 1)


def image_files(inputs: list[str | Path]) -> list[Path]:
    """Files as given; folders searched recursively for images, masks left out."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                            and not MASK_NAME.match(p.stem) and not p.name.startswith("."))
        else:
            files.append(item)
    return files


def run_predict(checkpoint_path: str | Path, inputs: list[str | Path], explain_dir: str | Path | None = None,
                progress: bool = False) -> list[dict]:
    """One row per image: path, predicted class, probability of each class, or the error that stopped it.

    With explain_dir, a Grad-CAM overlay of the predicted class is written there for each image.
    """
    if is_exported(checkpoint_path):
        if explain_dir is not None:
            raise BusiError(f"{checkpoint_path}: Grad-CAM needs the checkpoint.pth, not an exported model")
        exported = ExportedModel(checkpoint_path)
        model, config = None, exported.config
    else:
        model, config = checkpoint.load(checkpoint_path)
    if explain_dir is not None:
        from .explain import gradcam, overlay
        explain_dir = Path(explain_dir)
        explain_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    files = image_files(inputs)
    bar = tqdm(files, desc="predicting", unit="image", disable=not progress or len(files) < 8, leave=False)
    for n, path in enumerate(bar):
        try:
            original = preprocess.apply(read_image(path), config.get("preprocess", ()))  # what the model sees
        except BusiError as e:
            rows.append({"path": str(path), "error": str(e)})
            continue
        image = model_input(original, config["image_size"])
        probs = predict_probs(model, config, image) if model is not None else exported.probabilities(image)
        predicted = int(decide(probs, config["classes"], config.get("operating_point"))[0])
        probs = probs[0]
        row = {"path": str(path), "predicted": config["classes"][predicted],
               "probabilities": {c: round(float(p), 6) for c, p in zip(config["classes"], probs)}}
        if config.get("operating_point"):
            row["predicted_argmax"] = config["classes"][int(probs.argmax())]
        if explain_dir is not None:
            heat = gradcam(model, image, [predicted], config["mean"], config["std"])[0]
            target = explain_dir / f"{n:04d}-{Path(path).stem}-gradcam.png"
            Image.fromarray(overlay(original, heat)).save(target)
            row["explanation"] = str(target)
        rows.append(row)
    return rows
