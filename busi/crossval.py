"""k-fold cross-validation: out-of-fold predictions, per-fold metrics and cluster-bootstrap confidence intervals."""
from __future__ import annotations

import csv
import json
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
    grouped = cfg.split != "random"
    plans = fold_plans(cfg, labels, together, sources, classes)
    check_models(cfg, classes)
    masks, status = load_masks(dataset, cfg.image_size, cfg.preprocess)
    part = training_tensors(cfg, images, labels, masks, status)
    external = load_external(cfg, classes, progress) if cfg.external else None

    folder.mkdir(parents=True, exist_ok=True)
    save_config(cfg, folder / "config.yaml", {"busi_version": __version__, "command": "cv"})
    (folder / "audit.json").write_text(json.dumps(report, indent=2))
    (folder / "folds.json").write_text(json.dumps({
        "split": cfg.split, "folds": len(plans[0]), "repeats": cfg.repeats, "seed": cfg.seed,
        "test_folds": [[[paths[i] for i in te] for _, te in plan] for plan in plans],
        "left_out_label_conflicts": conflicted}, indent=2))

    fold_rows, oof_rows, summary = [], [], {}
    for arch in cfg.models:
        oof_probs, oof_raw, oof_labels, oof_groups, heat, heat_index = [], [], [], [], [], []
        oof_decided, thresholds = [], []  # the operating point's decisions, each fold with its own threshold
        external_probs, oof_sources = [], []
        # --split source: each held-out source after label-free adaptation; classes its training sources lacked
        adapted_probs, adapted_decided, untrained = [], [], {}
        oof_index, oof_flags = [], []  # which image each out-of-fold row is; its shift flag
        member_probs = [[] for _ in range(cfg.ensemble)] if cfg.ensemble > 1 else []
        for r, plan in enumerate(plans):
            for k, (train_idx, test_idx) in enumerate(plan):
                val_idx = np.array([], dtype=int)
                if cfg.val_size > 0:  # the same carve-out as `busi train`, so CV measures that recipe
                    sub_train, sub_val = train_test(labels[train_idx].numpy(), together[train_idx], cfg.val_size,
                                                    cfg.seed + r, grouped, sources[train_idx])
                    train_idx, val_idx = train_idx[sub_train], train_idx[sub_val]
                model, config, _, extras = train_one(arch, cfg, classes, part, train_idx, val_idx, folder / arch / f"repeat{r}-fold{k}",
                                             progress=progress, checkpoints=False, seed=cfg.seed + 1000 * r + k)
                norm = config["mean"], config["std"]
                if keep_models:
                    config["trained_on"] = sorted({str(sources[i]) for i in train_idx})  # source names, not folders
                    checkpoint.save(folder / arch / f"repeat{r}-fold{k}" / "checkpoint.pth", model, config, extras=extras)
                logits, maps = outputs_of(model, images[test_idx], *norm, tta=cfg.tta)
                scores = lesion_scores(maps) if maps is not None else None
                probs = probabilities(logits, config)
                m = compute_metrics(probs, labels[test_idx], classes)
                if config.get("operating_point"):
                    oof_decided.append(decide(probs, classes, config["operating_point"], scores))
                    thresholds.append(config["operating_point"]["threshold"])
                fold_rows.append({"model": arch, "repeat": r, "fold": k, "n_train": len(train_idx), "n_val": len(val_idx),
                                  "n_test": len(test_idx), "train_seconds": config["train_seconds"],
                                  "temperature": round(config["temperature"], 4), "accuracy": m["accuracy"],
                                  "macro_f1": m["macro_f1"], "auroc": m["auroc"],
                                  **{f"recall_{c}": m["per_class"][c]["recall"] for c in classes}})
                dice = dice_iou(maps, masks[test_idx])[0] if maps is not None else None
                for j, (i, p) in enumerate(zip(test_idx.tolist(), probs.tolist())):
                    oof_rows.append({"model": arch, "repeat": r, "fold": k, "path": paths[i], "true": classes[labels[i]],
                                     **{f"p_{c}": round(v, 6) for c, v in zip(classes, p)},
                                     **({"lesion_score": round(float(scores[j]), 5),
                                         "lesion_dice": round(float(dice[j]), 4) if status[i] in ("lesion", "empty")
                                         else ""} if scores is not None else {})})
                oof_probs.append(probs)
                if config.get("shift"):  # which test images the fold model would call unlike its training images
                    oof_flags.append(shift.distances(extras, config["shift"], shift.features(model, images[test_idx], *norm))
                                     > config["shift"]["threshold"])
                    for row, flag in zip(oof_rows[-len(test_idx):], oof_flags[-1].tolist()):
                        row["outside_training"] = int(flag)
                if config.get("operating_point"):
                    for row in oof_rows[-len(test_idx):]:
                        row["threshold"] = config["operating_point"]["threshold"]
                if cfg.split == "source":
                    held_out = str(sources[test_idx[0]])
                    adapted = adapt_batchnorm(model, images[test_idx], *norm)
                    adapted_logits, adapted_maps = outputs_of(adapted, images[test_idx], *norm, tta=cfg.tta)
                    adapted_probs.append(probabilities(adapted_logits, config))
                    if config.get("operating_point"):
                        adapted_decided.append(decide(adapted_probs[-1], classes, config["operating_point"],
                                                      lesion_scores(adapted_maps) if adapted_maps is not None else None))
                    for row, p in zip(oof_rows[-len(test_idx):], adapted_probs[-1].tolist()):
                        row.update({f"adapted_p_{c}": round(v, 6) for c, v in zip(classes, p)})
                    untrained[held_out] = [c for i, c in enumerate(classes) if not bool((labels[train_idx] == i).any())
                                           and not (c == "normal" and cfg.lesion_windows > 0)]  # windows teach it
                if external is not None:
                    external_probs.append(probabilities(logits_of(model, external["images"], *norm, tta=cfg.tta), config))
                if isinstance(model, Ensemble):  # each member alone: the spread over training seeds, at no training cost
                    for k_m, member in enumerate(model.members):
                        member_probs[k_m].append(torch.softmax(logits_of(member, images[test_idx], *norm, tta=cfg.tta), 1))
                oof_raw.append(torch.softmax(logits, 1))
                oof_labels.append(labels[test_idx])
                oof_groups.append(together[test_idx])
                oof_index += test_idx.tolist()
                oof_sources.append(sources[test_idx])
                lesion = [i for i in test_idx.tolist() if status[i] == "lesion"]
                if lesion:
                    heat.append(gradcam(model, images[lesion], probs.argmax(1)[np.isin(test_idx, lesion)].tolist(), *norm))
                    heat_index += lesion
                print(f"{arch} repeat {r} fold {k}: accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f} "
                      f"({config['train_seconds']:.0f} s)", flush=True)
        probs, y, g = torch.cat(oof_probs), torch.cat(oof_labels), np.concatenate(oof_groups)
        pooled = compute_metrics(probs, y, classes)
        per_fold = [row for row in fold_rows if row["model"] == arch]
        raw = torch.cat(oof_raw)
        localization = summarize_localization(np.concatenate(heat) if heat else np.zeros((0, 1, 1)),
                                              [masks[i, 0].numpy().astype(bool) for i in heat_index],
                                              [int(labels[i]) for i in heat_index], classes, status)
        summary[arch] = {
            "model": arch, "parameters": count_parameters(model), "folds": len(plans[0]), "repeats": cfg.repeats,
            "split": cfg.split, "n_images": len(paths), "n_predictions": int(len(y)),
            "mean_train_seconds": round(float(np.mean([row["train_seconds"] for row in per_fold])), 1),
            "ci_method": f"95% percentile bootstrap over {unit} of the pooled out-of-fold predictions "
                         f"({n_boot} resamples; repeats pooled)",
            "metrics": bootstrap_ci(probs, y, g, classes, n_boot=n_boot, seed=cfg.seed),
            "fold_mean_std": {key: _mean_std([row[key] for row in per_fold]) for key in ("accuracy", "macro_f1", "auroc")},
            "pooled": pooled,
            "calibration": {"ece_before": round(ece(raw, y), 4), "ece_after": round(ece(probs, y), 4),
                            "note": ("no validation part (val_size 0): no temperature fitted" if cfg.val_size == 0
                                     else "per-fold temperatures fitted on each fold's validation part"
                                     if cfg.fit_temperature
                                     else "no temperature fitted (fit_temperature: false): after = before")},
            "localization": localization,
        }
        if cfg.malignant_recall is not None:
            summary[arch]["operating_point"] = {
                "target_recall": cfg.malignant_recall, "class": "malignant",
                "note": "each fold's threshold set on its own validation part; decisions pooled out of fold",
                "thresholds": thresholds,
                **(decision_metrics(torch.cat(oof_decided), y, classes) if len(oof_decided) == len(oof_probs) else
                   {"error": "a fold had no malignant validation image to set the threshold on"})}
        if len(oof_flags) == len(oof_probs):
            summary[arch]["shift"] = {"note": "test images each fold model called unlike its training images (threshold: "
                                              f"{shift.QUANTILE:.0%} of its validation images lie within it)",
                                      **shift.verdict(torch.cat(oof_flags))}
        if member_probs:
            members = [compute_metrics(torch.cat(mp), y, classes) for mp in member_probs]
            summary[arch]["members_alone"] = {
                "note": "each ensemble member (its own training seed) scored alone, pooled out-of-fold, no temperature",
                **{key: [round(m[key], 4) for m in members] for key in ("accuracy", "macro_f1", "auroc")},
                "recall_malignant": [round(m["per_class"]["malignant"]["recall"], 4) for m in members
                                     if "malignant" in m["per_class"]]}
        if dataset.sources:
            decided = torch.cat(oof_decided) if len(oof_decided) == len(oof_probs) else None
            summary[arch]["per_source"] = per_source_cv(probs, y, g, np.concatenate(oof_sources), classes, unit,
                                                        [image_groups[i] for i in oof_index] if image_groups else None,
                                                        decided,
                                                        torch.cat(adapted_probs) if adapted_probs else None, untrained,
                                                        torch.cat(adapted_decided) if decided is not None and adapted_decided
                                                        else None,
                                                        torch.cat(oof_flags) if len(oof_flags) == len(oof_probs) else None)
        if external is not None:
            summary[arch]["external"], mean = fold_average(external_probs, thresholds, external, cfg, classes)
            ext_paths = [s.path for s in external["dataset"].samples]
            write_csv(folder / arch / "external_predictions.csv",
                       [{"path": p, "true": classes[int(t)], **{f"p_{c}": round(float(v), 6) for c, v in zip(classes, row)}}
                        for p, t, row in zip(ext_paths, external["labels"], mean)])
        confusion_matrix(pooled["confusion_matrix"], classes, folder / arch / "confusion_matrix.png",
                         f"{arch}, pooled out-of-fold (n={len(y)})")
    write_csv(folder / "fold_metrics.csv", fold_rows)
    write_csv(folder / "oof_predictions.csv", oof_rows)
    (folder / "cv_metrics.json").write_text(json.dumps(summary, indent=2))
    render(folder)
    return folder


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
