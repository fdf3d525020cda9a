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

from . import __version__, checkpoint, hardware, shift
from .audit import audit
from .audit import fingerprints as audit_fingerprints
from .config import SPLIT_SOURCE_TRAIN, RunConfig, save_config
from .data import MASK_USABLE, Dataset, load, load_masks, scan, warn
from .folders import scan_sources
from .meta import source_meta
from .confidence import fit_temperature
from .lesion import lesion_scores
from .operating import MIN_POSITIVES, fit_joint_rule, fit_threshold
from .errors import BusiError
from .models import IMAGENET_WEIGHTS, Ensemble, build, count_parameters, has_segmenter, normalization, with_segmenter
from .plots import loss_curves
from .report import render
from .results import write_results
from .split import group_ids, train_test
from .inference import outputs_of, probabilities
from .runs import is_main_process, run_dir
from .train import check_hardware, fit


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2))


def prepare(cfg: RunConfig, progress: bool = True, notes: list[str] = ()) -> tuple[Dataset, dict, torch.Tensor, torch.Tensor, list[str]]:
    """Scan, audit, leave out label conflicts and unreadable files, decode the rest once into memory.

    notes (the hardware choice) are printed once the folder is known to be there, so a bad --data stays one line.
    """
    dataset = scan_sources(cfg.data, cfg.classes)
    absent = []  # fine-tuning: the parent's classes this data lacks (they are kept, not trained)
    if cfg.init_checkpoint:
        from .external import relabel
        dataset, absent = relabel(dataset, checkpoint.read(cfg.init_checkpoint)["config"]["classes"], cfg.init_checkpoint)
    if cfg.cine_frames == "all":
        from .folders import every_frame
        dataset = every_frame(dataset)
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
    if cfg.meta:
        columns = {"patient": cfg.patient_column, "group": cfg.group_column}
        wanted = [c for c in columns.values() if c]
        rows, lines = source_meta([s.path for s in kept.samples], [kept.source_of(s) for s in kept.samples], cfg.meta,
                                  cfg.id_column, wanted)
        for line in lines:
            warn(line)
        kept.info = {path: {key: row[col] for key, col in columns.items() if col and row.get(col)}
                     for path, row in rows.items()}
    from .folders import header_info
    for path, known in header_info(kept).items():  # a DICOM's patient and scanner, where no CSV named them
        kept.info[path] = {**known, **kept.info.get(path, {})}
    counts = kept.counts()
    for c, n in counts.items():
        if n == 0 and c not in absent:
            raise BusiError(f"{dataset.root / c}: no usable images left in this class")
    if sum(n > 0 for n in counts.values()) < 2:
        held = ", ".join(c for c, n in counts.items() if n) or "no usable images"
        raise BusiError(f"{', '.join(map(str, cfg.data))}: holds only {held}; a classifier needs images of at least "
                        "two classes")
    if kept.sources:
        counts = ", ".join(f"{name} {sum(kept.source_of(s) == name for s in kept.samples)}" for name in kept.sources)
        print(f"busi: pooling {len(kept.sources)} sources: {counts} images", file=sys.stderr, flush=True)
    return kept, report, images, labels, conflicted


def training_tensors(cfg: RunConfig, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, status: list[str]):
    """index -> the tensors fit() trains on: images and labels, plus lesion masks when the recipe learns them or cuts
    windows by them."""
    if cfg.mask_weight <= 0 and cfg.lesion_windows <= 0 and not cfg.lesion_size:
        return lambda idx: (images[idx], labels[idx])
    known = torch.tensor([st in MASK_USABLE for st in status])
    return lambda idx: (images[idx], labels[idx], masks[idx], known[idx])


def build_for(arch: str, cfg: RunConfig, n_classes: int):
    """A fresh model as cfg wants it: the weights of cfg.init_checkpoint (fine-tuning; a segmenter added when cfg has
    lesion_size and the parent has none), or ImageNet weights (downloaded or --weights) for the models that have them."""
    if cfg.init_checkpoint:
        model = checkpoint.load(cfg.init_checkpoint)[0].train()
        return with_segmenter(model, cfg.lesion_size) if cfg.lesion_size and not has_segmenter(model) else model
    return build(arch, n_classes, pretrained=cfg.pretrained and arch in IMAGENET_WEIGHTS,
                 weights=cfg.weights if arch in IMAGENET_WEIGHTS else None, lesion_size=cfg.lesion_size)


def train_one(arch: str, cfg: RunConfig, classes, part, train_idx, val_idx, out_dir: Path, test_idx=None,
              resume: bool = False, progress: bool = True, checkpoints: bool = True, seed: int | None = None,
              shift_summary: bool = True):
    """Build, seed and train one model; calibrate it on the validation part and summarise its training images there
    (busi.shift). -> (model, config, history, extra tensors for the checkpoint)."""
    start = time.perf_counter()
    val = part(val_idx)[:2] if len(val_idx) else None
    test = part(test_idx)[:2] if test_idx is not None else None
    training = part(train_idx)  # indexed once: the images are most of the memory
    trained = sorted(set(training[1].tolist()) | ({list(classes).index("normal")} if "normal" in classes
                                                           and cfg.lesion_windows > 0 else set()))
    # fine-tuning on some of the parent's classes: the loss over those, the parent keeping the rest (busi.train)
    present = trained if cfg.init_checkpoint and len(trained) < len(classes) else None
    teacher = checkpoint.load(cfg.init_checkpoint)[0] if cfg.init_checkpoint and cfg.distill_weight > 0 else None
    members, histories = [], []
    for k in range(cfg.ensemble):  # an ensemble's members differ only by seed: initial weights, order, augmentation
        L.seed_everything((cfg.seed if seed is None else seed) + 7919 * k, verbose=False)
        member, history = fit(build_for(arch, cfg, len(classes)), cfg, training,
                              out_dir / f"member{k}" if cfg.ensemble > 1 else out_dir, val=val, test=test, resume=resume,
                              progress=progress, checkpoints=checkpoints, normalization=normalization(arch),
                              normal_index=list(classes).index("normal") if "normal" in classes else None,
                              present=present, teacher=teacher)
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
    if cfg.init_checkpoint:
        from .adapt import parent_of
        config["parent"] = parent_of(cfg.init_checkpoint, checkpoint.read(cfg.init_checkpoint)["config"])
    config["train_seconds"] = round(time.perf_counter() - start, 1)
    extras = {}
    if val is not None:
        fit_temperature_and_rule(model, config, cfg, val)
        if len(val[1]) >= shift.MIN_HELDOUT:  # enough held-out images to say where 'like the training images' ends
            extras, config["shift"] = shift.summarize(shift.features(model, training[0], config["mean"], config["std"]),
                                                      shift.features(model, val[0], config["mean"], config["std"]))
    if shift_summary and "shift" not in config and is_main_process():
        warn(f"{out_dir.name}: no shift summary ({len(val_idx)} validation images, {shift.MIN_HELDOUT} needed): this "
             "model cannot say when an image is unlike its training images (raise --val-size, or add images)")
    return model, config, history, extras


def fit_temperature_and_rule(model, config: dict, cfg: RunConfig, val) -> None:
    """On the validation part (images, labels): the temperature (if cfg fits one) and the decision rule (the malignant
    threshold; with a segmenter, the lesion-first rule)."""
    val_logits, val_maps = outputs_of(model, val[0], config["mean"], config["std"], tta=cfg.tta)
    config["temperature"] = fit_temperature(val_logits, val[1]) if cfg.fit_temperature else 1.0
    config["temperature_fitted_on"] = len(val[1]) if cfg.fit_temperature else 0
    if cfg.malignant_recall is not None:
        val_probs = probabilities(val_logits, config)
        point = fit_threshold(val_probs, val[1], list(config["classes"]), cfg.malignant_recall)
        if val_maps is not None and "benign" in config["classes"] and point is not None:
            try:  # a segmenter decides 'normal' and where malignancy is judged (busi.operating's lesion-first rule)
                point = fit_joint_rule(val_probs, lesion_scores(val_maps), val[1], list(config["classes"]),
                                       cfg.malignant_recall, where="validation images")
            except BusiError as e:
                warn(f"{e}; the model keeps the plain malignant threshold")
        parent = checkpoint.read(cfg.init_checkpoint)["config"].get("operating_point") if cfg.init_checkpoint else None
        if parent and (point is None or point["fitted_on_positives"] < MIN_POSITIVES):  # too few to re-set it
            point = {**parent, "kept_from_parent": f"the validation part held {0 if point is None else point['fitted_on_positives']}"
                                                   f" malignant images, fewer than {MIN_POSITIVES}"}
        config["operating_point"] = point


def _checkpoint_config(arch: str, cfg: RunConfig, classes) -> dict:
    mean, std = normalization(arch)
    roots = [str(Path(d).resolve()) for d in cfg.data]
    return {"arch": arch, "classes": list(classes), "image_size": cfg.image_size, "mean": list(mean),
            "std": list(std), "preprocess": list(cfg.preprocess), "trained_on": roots if len(roots) > 1 else roots[0],
            "trained_at": datetime.now().isoformat(timespec="seconds"),
            "seed": cfg.seed, "epochs": cfg.epochs, "tta": cfg.tta, "temperature": 1.0, "version": __version__,
            **({"lesion_size": cfg.lesion_size} if cfg.lesion_size else {})}


def check_models(cfg: RunConfig, classes) -> None:
    """Build every model once before training any, so a missing weight file fails in seconds, not after an hour."""
    if cfg.lesion_windows > 0 and "normal" not in classes:
        raise BusiError(f"'lesion_windows' labels lesion-free views 'normal', but the classes are {', '.join(classes)}")
    n_classes = len(classes)
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
    if cfg.split == "source":
        raise BusiError(SPLIT_SOURCE_TRAIN)
    folder = run_dir(out, "-".join(cfg.models), overwrite, resume)
    main = is_main_process()
    cfg, notes = hardware.resolve(cfg)
    check_hardware(cfg)
    os.environ["BUSI_RUN_DIR"] = str(folder.resolve())  # inherited by DDP worker processes Lightning starts
    progress = progress and main
    dataset, report, images, labels, conflicted = prepare(cfg, progress, notes if main else [])
    check_models(cfg, dataset.classes)
    paths = [s.path for s in dataset.samples]
    grouped = cfg.split == "grouped"
    groups = group_ids(paths, report["duplicate_groups"], dataset.patient_groups()) if grouped else np.arange(len(paths))
    sources = [dataset.source_of(s) for s in dataset.samples]
    source_arr = np.asarray(sources)
    if cfg.test_size > 0:
        train_idx, test_idx = train_test(labels.numpy(), groups, cfg.test_size, cfg.seed, grouped, sources,
                                         dataset.classes, "test part (test_size)")
    else:  # every image trains; the test is a folder the model never saw, with `busi evaluate`
        train_idx, test_idx = np.arange(len(paths)), np.array([], dtype=int)
    val_idx = np.array([], dtype=int)
    if cfg.val_size > 0:
        sub_train, sub_val = train_test(labels[train_idx].numpy(), groups[train_idx], cfg.val_size, cfg.seed, grouped,
                                        source_arr[train_idx], dataset.classes, "validation part (val_size)")
        train_idx, val_idx = train_idx[sub_train], train_idx[sub_val]
    if main:
        def per_class(idx):
            return ", ".join(f"{int((labels[idx] == k).sum())} {c}" for k, c in enumerate(dataset.classes))
        print(f"busi: {len(paths)} images: {len(train_idx)} train ({per_class(train_idx)})"
              + (f", {len(val_idx)} validation ({per_class(val_idx)})" if len(val_idx) else "")
              + (f", {len(test_idx)} test ({per_class(test_idx)})" if len(test_idx) else "")
              + f"; {'grouped split (a patient and near-duplicates on one side)' if grouped else 'random split'}, "
              f"seed {cfg.seed}",
              file=sys.stderr)

    if main:
        _write_run_files(folder, cfg, report, {
            "seed": cfg.seed, "test_size": cfg.test_size, "val_size": cfg.val_size, "split": cfg.split,
            "classes": list(dataset.classes),
            "train": [paths[i] for i in train_idx], "val": [paths[i] for i in val_idx], "test": [paths[i] for i in test_idx],
            "left_out_label_conflicts": conflicted, "skipped": dataset.skipped})
    masks, status = load_masks(dataset, cfg.image_size, cfg.preprocess)
    part = training_tensors(cfg, images, labels, masks, status)
    histories, rows = {}, []
    fingerprints = None
    for arch in cfg.models:
        model, config, history, extras = train_one(arch, cfg, dataset.classes, part, train_idx, val_idx, folder / arch,
                                           test_idx=test_idx if len(test_idx) else None, resume=resume, progress=progress)
        if not main:
            continue
        if cfg.ensemble > 1:  # a curve per member
            histories.update({f"{arch} member {k}": [r for r in history if r["member"] == k] for k in range(cfg.ensemble)})
        else:
            histories[arch] = history
        if fingerprints is None:  # the images that shaped the model (training and validation part), once for all models
            shaped = np.concatenate([train_idx, val_idx])
            fingerprints = audit_fingerprints(dataset.subset(shaped), progress)
            config_paths = [paths[i] for i in shaped]
            if cfg.init_checkpoint:  # and those that shaped its parent
                _, parent, inherited = checkpoint.load(cfg.init_checkpoint, extras=True)
                if "fingerprints.phash" in inherited and parent.get("fingerprint_paths"):
                    # an image both trained on (the same pixels: hash and thumbnail) is fingerprinted once
                    own = {tuple(torch.cat([v[i].flatten().float() for v in fingerprints.values()]).tolist())
                           for i in range(len(config_paths))}
                    keep = [i for i in range(len(parent["fingerprint_paths"]))
                            if tuple(torch.cat([inherited[k][i].flatten().float() for k in fingerprints]).tolist())
                            not in own]
                    fingerprints = {k: torch.cat([inherited[k][keep], v]) for k, v in fingerprints.items()}
                    config_paths = [f"parent:{parent['fingerprint_paths'][i]}" for i in keep] + config_paths
        config["fingerprint_paths"] = config_paths
        checkpoint.save(folder / arch / "checkpoint.pth", model, config, extras={**extras, **fingerprints})
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


