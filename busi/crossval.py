"""k-fold cross-validation: out-of-fold predictions, per-fold metrics and cluster-bootstrap confidence intervals."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__, checkpoint, hardware, shift
from .config import RunConfig, save_config
from .confidence import ece
from .data import load_masks
from .metrics import bootstrap_ci, compute_metrics
from .operating import decide, decision_metrics
from .adapt import adapt_batchnorm
from .explain import gradcam, summarize_localization
from .external import fold_average, load_external, malignant_vs_benign, per_group
from .models import Ensemble, count_parameters
from .plots import confusion_matrix
from .report import interval_text, render
from .split import group_ids, kfold, source_folds, train_test
from .inference import logits_of, outputs_of, probabilities
from .lesion import dice_iou, lesion_scores
from .train import check_hardware
from .workflow import check_models, prepare, run_dir, train_one, training_tensors


@dataclass
class CvInputs:
    """The prepared folder every fold draws from: images, labels and what groups, sources and masks say of them."""
    images: torch.Tensor
    labels: torch.Tensor
    paths: list[str]
    classes: list[str]
    together: np.ndarray  # one id per image: patients joined with near-duplicates (never split, resampled together)
    sources: np.ndarray
    masks: torch.Tensor
    status: list[str]
    external: dict | None


@dataclass
class Pooled:
    """What one model's fold models said about their test images, fold after fold (concatenated at the end)."""
    probs: list = field(default_factory=list)  # after each fold's temperature
    raw: list = field(default_factory=list)  # before it
    labels: list = field(default_factory=list)
    groups: list = field(default_factory=list)
    sources: list = field(default_factory=list)
    index: list = field(default_factory=list)  # which image each row is
    decided: list = field(default_factory=list)  # the operating point's decisions, each fold with its own threshold
    thresholds: list = field(default_factory=list)
    flags: list = field(default_factory=list)  # shift flags
    adapted_probs: list = field(default_factory=list)  # --split source: after label-free adaptation to the held-out one
    adapted_decided: list = field(default_factory=list)
    untrained: dict = field(default_factory=dict)  # per held-out source, the classes its training sources lacked
    external_probs: list = field(default_factory=list)
    members: list = field(default_factory=list)  # ensembles: each member alone, per fold
    heat: list = field(default_factory=list)  # Grad-CAM maps of images with a lesion mask, and which images
    heat_index: list = field(default_factory=list)

    def complete(self, name: str) -> torch.Tensor | None:
        """A per-fold list concatenated, or None when some fold had none (e.g. no threshold could be set)."""
        parts = getattr(self, name)
        return torch.cat(parts) if parts and len(parts) == len(self.probs) else None


def run_cv(cfg: RunConfig, out: str | Path | None = None, overwrite: bool = False, progress: bool = True,
           n_boot: int = 1000, keep_models: bool = False) -> Path:
    """Train and test every model on every fold (of every repeat); each image is scored by models that never saw it.

    keep_models: each fold's model is saved as <arch>/repeatR-foldK/checkpoint.pth (with --split source: a model of
    the other hospitals, e.g. to fine-tune on the held-out one)."""
    folder = run_dir(out, "cv-" + "-".join(cfg.models), overwrite)
    cfg, notes = hardware.resolve(cfg)
    check_hardware(cfg)
    dataset, report, images, labels, conflicted = prepare(cfg, progress, notes)
    paths = [s.path for s in dataset.samples]
    classes = list(dataset.classes)
    together = group_ids(paths, report["duplicate_groups"], dataset.patient_groups())  # and patients, when known
    unit = "patients and duplicate groups" if dataset.patient_groups() else "duplicate groups"  # what CIs resample
    image_groups = [dataset.info.get(p, {}).get("group", "unknown") for p in paths] if cfg.group_column else None
    sources = np.asarray([dataset.source_of(s) for s in dataset.samples])
    plans = fold_plans(cfg, labels, together, sources, classes)
    check_models(cfg, classes)
    masks, status = load_masks(dataset, cfg.image_size, cfg.preprocess)
    part = training_tensors(cfg, images, labels, masks, status)
    data = CvInputs(images, labels, paths, classes, together, sources, masks, status,
                    load_external(cfg, classes, progress) if cfg.external else None)

    folder.mkdir(parents=True, exist_ok=True)
    save_config(cfg, folder / "config.yaml", {"busi_version": __version__, "command": "cv"})
    (folder / "audit.json").write_text(json.dumps(report, indent=2))
    (folder / "folds.json").write_text(json.dumps({
        "split": cfg.split, "folds": len(plans[0]), "repeats": cfg.repeats, "seed": cfg.seed,
        "test_folds": [[[paths[i] for i in te] for _, te in plan] for plan in plans],
        "left_out_label_conflicts": conflicted}, indent=2))

    fold_rows, oof_rows, summary = [], [], {}
    for arch in cfg.models:
        pooled = Pooled(members=[[] for _ in range(cfg.ensemble)] if cfg.ensemble > 1 else [])
        for r, plan in enumerate(plans):
            for k, (train_idx, test_idx) in enumerate(plan):
                val_idx = np.array([], dtype=int)
                if cfg.val_size > 0:  # the same carve-out as `busi train`, so CV measures that recipe
                    sub_train, sub_val = train_test(labels[train_idx].numpy(), together[train_idx], cfg.val_size,
                                                    cfg.seed + r, cfg.split != "random", sources[train_idx])
                    train_idx, val_idx = train_idx[sub_train], train_idx[sub_val]
                model, config, _, extras = train_one(arch, cfg, classes, part, train_idx, val_idx,
                                                     folder / arch / f"repeat{r}-fold{k}", progress=progress,
                                                     checkpoints=False, seed=cfg.seed + 1000 * r + k)
                if keep_models:
                    config["trained_on"] = sorted({str(sources[i]) for i in train_idx})  # source names, not folders
                    checkpoint.save(folder / arch / f"repeat{r}-fold{k}" / "checkpoint.pth", model, config, extras=extras)
                m = score_fold(model, config, extras, cfg, data, train_idx, test_idx, pooled, oof_rows,
                               {"model": arch, "repeat": r, "fold": k})
                fold_rows.append({"model": arch, "repeat": r, "fold": k, "n_train": len(train_idx), "n_val": len(val_idx),
                                  "n_test": len(test_idx), "train_seconds": config["train_seconds"],
                                  "temperature": round(config["temperature"], 4), "accuracy": m["accuracy"],
                                  "macro_f1": m["macro_f1"], "auroc": m["auroc"],
                                  **{f"recall_{c}": m["per_class"][c]["recall"] for c in classes}})
                print(f"{arch} repeat {r} fold {k}: accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f} "
                      f"({config['train_seconds']:.0f} s)", flush=True)
        summary[arch] = summarize_model(arch, model, cfg, data, pooled, [row for row in fold_rows if row["model"] == arch],
                                        unit, image_groups, n_boot, len(plans[0]), bool(dataset.sources))
        if data.external is not None:
            summary[arch]["external"], mean = fold_average(pooled.external_probs, pooled.thresholds, data.external, cfg,
                                                           classes)
            write_csv(folder / arch / "external_predictions.csv",
                      [{"path": s.path, "true": classes[int(t)], **{f"p_{c}": round(float(v), 6) for c, v in zip(classes, row)}}
                       for s, t, row in zip(data.external["dataset"].samples, data.external["labels"], mean)])
        confusion_matrix(summary[arch]["pooled"]["confusion_matrix"], classes, folder / arch / "confusion_matrix.png",
                         f"{arch}, pooled out-of-fold (n={summary[arch]['n_predictions']})")
    write_csv(folder / "fold_metrics.csv", fold_rows)
    write_csv(folder / "oof_predictions.csv", oof_rows)
    (folder / "cv_metrics.json").write_text(json.dumps(summary, indent=2))
    render(folder)
    return folder


def score_fold(model, config: dict, extras: dict, cfg: RunConfig, data: CvInputs, train_idx: np.ndarray,
               test_idx: np.ndarray, pooled: Pooled, oof_rows: list[dict], row_key: dict) -> dict:
    """One fold model on its test images: appends to pooled and oof_rows (one row per image), returns its metrics."""
    classes, norm, images = data.classes, (config["mean"], config["std"]), data.images[test_idx]
    logits, maps = outputs_of(model, images, *norm, tta=cfg.tta)
    scores = lesion_scores(maps) if maps is not None else None
    probs = probabilities(logits, config)
    op = config.get("operating_point")
    rows = [{**row_key, "path": data.paths[i], "true": classes[data.labels[i]],
             **{f"p_{c}": round(v, 6) for c, v in zip(classes, p)}} for i, p in zip(test_idx.tolist(), probs.tolist())]
    if scores is not None:
        dice = dice_iou(maps, data.masks[test_idx])[0]
        for j, (row, i) in enumerate(zip(rows, test_idx.tolist())):
            row.update({"lesion_score": round(float(scores[j]), 5),
                        "lesion_dice": round(float(dice[j]), 4) if data.status[i] in ("lesion", "empty") else ""})
    if op:
        pooled.decided.append(decide(probs, classes, op, scores))
        pooled.thresholds.append(op["threshold"])
        for row in rows:
            row["threshold"] = op["threshold"]
    if config.get("shift"):  # which test images the fold model would call unlike its training images
        pooled.flags.append(shift.distances(extras, config["shift"], shift.features(model, images, *norm))
                            > config["shift"]["threshold"])
        for row, flag in zip(rows, pooled.flags[-1].tolist()):
            row["outside_training"] = int(flag)
    if cfg.split == "source":
        adapted = adapt_batchnorm(model, images, *norm)
        adapted_logits, adapted_maps = outputs_of(adapted, images, *norm, tta=cfg.tta)
        pooled.adapted_probs.append(probabilities(adapted_logits, config))
        if op:
            pooled.adapted_decided.append(decide(pooled.adapted_probs[-1], classes, op,
                                                 lesion_scores(adapted_maps) if adapted_maps is not None else None))
        for row, p in zip(rows, pooled.adapted_probs[-1].tolist()):
            row.update({f"adapted_p_{c}": round(v, 6) for c, v in zip(classes, p)})
        trained = data.labels[train_idx]
        pooled.untrained[str(data.sources[test_idx[0]])] = [
            c for i, c in enumerate(classes) if not bool((trained == i).any())
            and not (c == "normal" and cfg.lesion_windows > 0)]  # windows teach it
    if data.external is not None:
        pooled.external_probs.append(probabilities(logits_of(model, data.external["images"], *norm, tta=cfg.tta), config))
    if isinstance(model, Ensemble):  # each member alone: the spread over training seeds, at no training cost
        for k_m, member in enumerate(model.members):
            pooled.members[k_m].append(torch.softmax(logits_of(member, images, *norm, tta=cfg.tta), 1))
    pooled.probs.append(probs)
    pooled.raw.append(torch.softmax(logits, 1))
    pooled.labels.append(data.labels[test_idx])
    pooled.groups.append(data.together[test_idx])
    pooled.index += test_idx.tolist()
    pooled.sources.append(data.sources[test_idx])
    lesion = [i for i in test_idx.tolist() if data.status[i] == "lesion"]
    if lesion:
        pooled.heat.append(gradcam(model, data.images[lesion], probs.argmax(1)[np.isin(test_idx, lesion)].tolist(), *norm))
        pooled.heat_index += lesion
    oof_rows += rows
    return compute_metrics(probs, data.labels[test_idx], classes)


def summarize_model(arch: str, model, cfg: RunConfig, data: CvInputs, pooled: Pooled, per_fold: list[dict], unit: str,
                    image_groups: list[str] | None, n_boot: int, n_folds: int, per_source: bool) -> dict:
    """cv_metrics.json's entry of one model: pooled out-of-fold figures with their intervals, per fold, per source."""
    classes = data.classes
    probs, y, g = torch.cat(pooled.probs), torch.cat(pooled.labels), np.concatenate(pooled.groups)
    raw, decided, flags = torch.cat(pooled.raw), pooled.complete("decided"), pooled.complete("flags")
    localization = summarize_localization(np.concatenate(pooled.heat) if pooled.heat else np.zeros((0, 1, 1)),
                                          [data.masks[i, 0].numpy().astype(bool) for i in pooled.heat_index],
                                          [int(data.labels[i]) for i in pooled.heat_index], classes, data.status)
    out = {
        "model": arch, "parameters": count_parameters(model), "folds": n_folds, "repeats": cfg.repeats,
        "split": cfg.split, "n_images": len(data.paths), "n_predictions": int(len(y)),
        "mean_train_seconds": round(float(np.mean([row["train_seconds"] for row in per_fold])), 1),
        "ci_method": f"95% percentile bootstrap over {unit} of the pooled out-of-fold predictions "
                     f"({n_boot} resamples; repeats pooled)",
        "metrics": bootstrap_ci(probs, y, g, classes, n_boot=n_boot, seed=cfg.seed),
        "fold_mean_std": {key: _mean_std([row[key] for row in per_fold]) for key in ("accuracy", "macro_f1", "auroc")},
        "pooled": compute_metrics(probs, y, classes),
        "calibration": {"ece_before": round(ece(raw, y), 4), "ece_after": round(ece(probs, y), 4),
                        "note": ("no validation part (val_size 0): no temperature fitted" if cfg.val_size == 0
                                 else "per-fold temperatures fitted on each fold's validation part"
                                 if cfg.fit_temperature
                                 else "no temperature fitted (fit_temperature: false): after = before")},
        "localization": localization,
    }
    if cfg.malignant_recall is not None:
        out["operating_point"] = {
            "target_recall": cfg.malignant_recall, "class": "malignant",
            "note": "each fold's threshold set on its own validation part; decisions pooled out of fold",
            "thresholds": pooled.thresholds,
            **(decision_metrics(decided, y, classes) if decided is not None else
               {"error": "a fold had no malignant validation image to set the threshold on"})}
    if flags is not None:
        out["shift"] = {"note": "test images each fold model called unlike its training images (threshold: "
                                f"{shift.QUANTILE:.0%} of its validation images lie within it)", **shift.verdict(flags)}
    if pooled.members:
        members = [compute_metrics(torch.cat(mp), y, classes) for mp in pooled.members]
        out["members_alone"] = {
            "note": "each ensemble member (its own training seed) scored alone, pooled out-of-fold, no temperature",
            **{key: [round(m[key], 4) for m in members] for key in ("accuracy", "macro_f1", "auroc")},
            "recall_malignant": [round(m["per_class"]["malignant"]["recall"], 4) for m in members
                                 if "malignant" in m["per_class"]]}
    if per_source:
        adapted = torch.cat(pooled.adapted_probs) if pooled.adapted_probs else None
        out["per_source"] = per_source_cv(probs, y, g, np.concatenate(pooled.sources), classes, unit,
                                          [image_groups[i] for i in pooled.index] if image_groups else None, decided,
                                          adapted, pooled.untrained,
                                          torch.cat(pooled.adapted_decided)
                                          if decided is not None and pooled.adapted_decided else None, flags)
    return out


def fold_plans(cfg: RunConfig, labels: torch.Tensor, together: np.ndarray, sources: np.ndarray, classes) -> list:
    """Per repeat, the (train, test) index pairs of its folds: grouped, random or hospital-out. All are made (and
    checked) before any training, so a bad --folds fails at once."""
    if cfg.split == "source":  # hospital-out: the same folds each repeat; repeats differ by training seed only
        return [source_folds(sources, labels.numpy(), together, classes)] * cfg.repeats
    grouped = cfg.split != "random"
    return [kfold(labels.numpy(), together if grouped else np.arange(len(labels)), cfg.folds, cfg.seed + r, grouped,
                  sources) for r in range(cfg.repeats)]


def per_source_cv(probs: torch.Tensor, labels: torch.Tensor, groups: np.ndarray, sources: np.ndarray, classes,
                  unit: str = "duplicate groups", image_groups: list[str] | None = None,
                  decided: torch.Tensor | None = None, adapted: torch.Tensor | None = None,
                  untrained: dict | None = None, adapted_decided: torch.Tensor | None = None,
                  flags: torch.Tensor | None = None) -> dict:
    """Each source's out-of-fold figures: every metric of its images alone, and malignant vs benign with a CI (a source
    may lack a class, e.g. 'normal', so the binary question is the one every source can answer).

    unit: what the confidence intervals resample (groups' kind); image_groups: each row's group (e.g. scanner), for
    per-group figures; decided: the operating point's out-of-fold decisions; adapted (--split source): the probabilities of each held-out
    source's fold model after label-free BatchNorm adaptation to that source; untrained: per source, the classes its
    fold's training sources lacked (figures of those classes say nothing of the model); flags: each row's shift flag
    (busi.shift: unlike the fold model's training images)."""
    out = {}
    for name in sorted(set(sources.tolist())):
        idx = torch.from_numpy(np.flatnonzero(sources == name))
        clusters = groups[idx.numpy()].tolist()
        out[name] = {**compute_metrics(probs[idx], labels[idx], classes),
                     "malignant_vs_benign": malignant_vs_benign(probs[idx], labels[idx], classes, clusters=clusters,
                                                                cluster_kind=unit)}
        if decided is not None:
            out[name]["operating_point"] = decision_metrics(decided[idx], labels[idx], classes)
        if flags is not None:
            out[name]["shift"] = shift.verdict(flags[idx])
        if image_groups is not None:  # e.g. per scanner
            out[name]["per_group"] = per_group(probs[idx], labels[idx], classes, [image_groups[i] for i in idx.tolist()],
                                               clusters=clusters)
        if untrained and untrained.get(name):
            out[name]["untrained_classes"] = untrained[name]
        if adapted is not None:
            out[name]["adapted"] = {
                "note": "the fold model after label-free BatchNorm adaptation to this source's images (busi adapt)",
                **compute_metrics(adapted[idx], labels[idx], classes),
                **({"untrained_classes": untrained[name]} if untrained and untrained.get(name) else {}),
                "malignant_vs_benign": malignant_vs_benign(adapted[idx], labels[idx], classes, clusters=clusters,
                                                           cluster_kind=unit)}
            if adapted_decided is not None:
                out[name]["adapted"]["operating_point"] = decision_metrics(adapted_decided[idx], labels[idx], classes)
    return out


def _mean_std(values: list) -> list | None:
    """[mean, std] over the folds that have the figure (a fold lacking a class has no macro AUROC), or None."""
    values = [v for v in values if v is not None]
    return [round(float(np.mean(values)), 4), round(float(np.std(values)), 4)] if values else None


def write_csv(path: Path, rows: list[dict]) -> None:
    """rows (dicts) as a CSV with a header line of every key any row has."""
    fields = list(dict.fromkeys(k for row in rows for k in row))  # a column some rows lack is left empty there
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def format_cv(summary: dict) -> str:
    lines = []
    for arch, s in summary.items():
        m = s["metrics"]
        parts = [f"{name} {v['estimate']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]" for name, v in m.items()]
        lines.append(f"{arch} ({s['split']} {s['folds']}-fold x{s['repeats']}): " + "; ".join(parts))
        op = s.get("operating_point")
        if op and "accuracy" in op:
            mal = op["per_class"]["malignant"]
            lines.append(f"{arch} at the operating point (target malignant recall {op['target_recall']}): malignant recall "
                         f"{mal['recall']:.3f}, precision {mal['precision'] or 0:.3f}, accuracy {op['accuracy']:.3f}")
        where = "held out (trained on the other sources only)" if s["split"] == "source" else "out of fold"
        for name, m in (s.get("per_source") or {}).items():
            lines.append(f"{arch} on source {name}, {where}: {_source_line(m)}")
            if "adapted" in m:
                lines.append(f"{arch} on source {name}, after label-free adaptation to it: {_source_line(m['adapted'])}")
        mvb = (s.get("external") or {}).get("malignant_vs_benign")
        if mvb and mvb["auroc"]:
            a, sens, spec = mvb["auroc"], mvb["sensitivity_argmax"], mvb["specificity_argmax"]
            lines.append(f"{arch} on {s['external']['data']} (the fold models averaged): malignant-vs-benign AUROC "
                         f"{a['estimate']:.3f} {interval_text(a, mvb)}, sensitivity {sens['estimate']:.3f}, "
                         f"specificity {spec['estimate']:.3f} (n={mvb['n']})")
    return "\n".join(lines)


def _source_line(m: dict) -> str:
    """One source's figures in a line: accuracy (unless a class it holds was never trained), malignant vs benign."""
    parts = [f"n={m['n']}"]
    if not m.get("untrained_classes"):
        parts.append(f"accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}")
    else:
        parts.append(f"no {', '.join(m['untrained_classes'])} in training: 3-class figures not meaningful")
    auc = (m.get("malignant_vs_benign") or {}).get("auroc")
    if auc:
        parts.append(f"malignant-vs-benign AUROC {auc['estimate']:.3f} {interval_text(auc, m['malignant_vs_benign'])}")
    recall = ((m.get("operating_point") or {}).get("per_class") or {}).get("malignant", {}).get("recall")
    if recall is not None:
        parts.append(f"malignant recall at the operating point {recall:.3f}")
    return ", ".join(parts)
