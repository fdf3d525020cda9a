"""Lesion segmentation judged out of fold: hospital-out (default) or within the pooled sources (--folds K), and the
decision rule it makes possible.

    python benchmarks/lesion.py --data ../shared/data/busi_dev --data ../shared/data/busbra_dev \
        --meta ../shared/data/busbra_dev/bus_data.csv --config configs/lesion.yaml --seed 0 \
        --classifier-cv benchmarks/results/hospitals-recommended --out benchmarks/results/lesion-hospitals

For each source in turn, a segmenter (the recipe's lesion_size, epochs and augmentation; the classifier frozen and
unused) trains on the other sources' masks (a normal scan's mask is empty) and outlines every image of the held-out
one. Written: lesion_oof.csv (per image: lesion score, Dice and IoU against the expert's mask, the fold),
lesion_metrics.json (per held-out source: Dice, normal-vs-lesion AUROC, detection). With --classifier-cv (a
`busi cv --split source` run of the classifier on the same sources), the lesion-first rule is scored on both
models' out-of-fold predictions: 'normal' below a lesion threshold, else malignant from p(malignant | lesion) =
p_m / (p_m + p_b) at a second threshold, both fitted together on the hospital-out predictions (busi.operating.
fit_joint_rule: 90% of the cancers at every held-out hospital, at most 10% of lesions called normal, then the most
normal scans called normal and benign lesions benign), with its trade-off, beside last release's fit (lesion
threshold for 95% of the lesions first: lesion95_rule_with_*).
With --folds K the segmenters are cross-validated within the pooled sources instead (grouped by patient and
near-duplicates: at home, where normal scans are in training); --rule-from busi/assets/card.json then applies the
bundled model's stored rule to these predictions instead of fitting one.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from busi import hardware  # noqa: E402
from busi.config import make_config  # noqa: E402
from busi.data import load_masks  # noqa: E402
from busi.inference import outputs_of  # noqa: E402
from busi.lesion import dice_iou, lesion_scores  # noqa: E402
from busi.meta import read_meta  # noqa: E402
from busi.metrics import cluster_resamples  # noqa: E402
from busi.models import build, normalization  # noqa: E402
from busi.operating import fit_joint_rule, fit_lesion_rule, lesion_rule_figures, rule_tradeoff  # noqa: E402
from busi.crossval import fold_plans  # noqa: E402
from busi.split import group_ids  # noqa: E402
from busi.train import fit  # noqa: E402
from busi.workflow import prepare, training_tensors  # noqa: E402


def other_scores(maps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Lesion-presence scores that do not stop at the peak, recorded beside it to be compared hospital-out: the share of
    the map over 0.5 (area), the mean probability (soft area), and the mean of its top 2% of pixels."""
    flat = maps.float().flatten(1)
    top = flat.topk(max(1, int(0.02 * flat.shape[1])), dim=1).values
    return {"score_area": (flat > 0.5).float().mean(1), "score_mean": flat.mean(1), "score_top2": top.mean(1)}


def segment_out_of_fold(cfg, out: Path) -> list[dict]:
    cfg, notes = hardware.resolve(cfg)
    dataset, report, images, labels, _ = prepare(cfg, True, notes)
    paths = [s.path for s in dataset.samples]
    masks, status = load_masks(dataset, cfg.image_size, cfg.preprocess)
    sources = np.asarray([dataset.source_of(s) for s in dataset.samples])
    together = group_ids(paths, report["duplicate_groups"], dataset.patient_groups())
    part = training_tensors(cfg, images, labels, masks, status)
    rows = []
    for k, (train_idx, test_idx) in enumerate(fold_plans(cfg, labels, together, sources, list(dataset.classes))[0]):
        held = str(sources[test_idx[0]]) if cfg.split == "source" else f"fold{k}"
        torch.manual_seed(cfg.seed + k)
        start = time.perf_counter()
        model = build(cfg.models[0], len(dataset.classes), pretrained=True, lesion_size=cfg.lesion_size)
        model, _ = fit(model, cfg, part(train_idx), out / f"fold{k}", progress=True, checkpoints=False,
                       normalization=normalization(cfg.models[0]))
        seconds = time.perf_counter() - start
        _, maps = outputs_of(model, images[test_idx], *normalization(cfg.models[0]), tta=cfg.tta)
        scores, others = lesion_scores(maps), other_scores(maps)
        dice, iou = dice_iou(maps, masks[test_idx])
        for j, i in enumerate(test_idx.tolist()):
            rows.append({"fold": k, "held_out": held, "source": str(sources[i]), "path": paths[i], "true": dataset.classes[int(labels[i])],
                         "mask": status[i], "lesion_score": round(float(scores[j]), 5),
                         **{name: round(float(v[j]), 6) for name, v in others.items()},
                         "dice": round(float(dice[j]), 4) if status[i] in ("lesion", "empty") else "",
                         "iou": round(float(iou[j]), 4) if status[i] in ("lesion", "empty") else "",
                         "train_seconds": round(seconds, 1)})
        print(f"held out {held}: trained on {len(train_idx)} images in {seconds / 60:.1f} min; mean Dice over lesions "
              f"{np.mean([r['dice'] for r in rows if r['held_out'] == held and r['mask'] == 'lesion']):.3f}", flush=True)
    return rows


def clusters_of(rows: list[dict], meta: list[str], patient_column: str, audits: list[Path]) -> list[int]:
    """Per row, the cluster the bootstrap resamples whole: one patient (the meta CSVs' patient column, matched by file
    stem on its ID column) joined with every near-duplicate of its images (the classifier runs' audit.json)."""
    paths = [r["path"] for r in rows]
    patients: dict[str, list[str]] = {}
    for csv_path in meta:
        known, _ = read_meta(csv_path, "ID", [patient_column], paths)
        for path, values in known.items():
            patients.setdefault(f"{csv_path}:{values[patient_column]}", []).append(path)
    duplicates = [g for a in audits if a.is_file() for g in json.loads(a.read_text())["duplicate_groups"]]
    return group_ids(paths, duplicates, list(patients.values())).tolist()


def _interval(values: list[float]) -> list[float] | None:
    return [round(float(np.quantile(values, q)), 4) for q in (0.025, 0.975)] if values else None


def summarize(rows: list[dict], clusters: list[int], n_boot: int = 1000) -> dict:
    from sklearn.metrics import roc_auc_score
    out = {}
    key = lambda r: r.get("source") or r["held_out"]  # noqa: E731  (per source, also when folds mix them)
    for held in sorted({key(r) for r in rows}):
        mine = [r for r in rows if key(r) == held]
        lesion = [r for r in mine if r["mask"] == "lesion"]
        normal = [r for r in mine if r["true"] == "normal"]
        dice = np.array([r["dice"] for r in lesion], dtype=float)
        who = np.array([c for r, c in zip(rows, clusters) if r["mask"] == "lesion" and key(r) == held])
        entry = {"images": len(mine), "lesion_images": len(lesion), "normal_images": len(normal),
                 "dice_mean": round(float(dice.mean()), 4),
                 "dice_ci": _interval([float(dice[pick].mean()) for pick in cluster_resamples(who, n_boot)]),
                 "ci_method": f"95% percentile bootstrap ({n_boot} resamples) over {len(set(who.tolist()))} lesion "
                              "clusters (patients joined with near-duplicates)",
                 "dice_median": round(float(np.median(dice)), 4),
                 "iou_mean": round(float(np.mean([r["iou"] for r in lesion])), 4),
                 "lesions_outlined": round(float(np.mean([r["lesion_score"] >= 0.5 for r in lesion])), 4),
                 "train_minutes": round(float(mine[0]["train_seconds"]) / 60, 1)}
        if normal:
            truth = np.array([0] * len(normal) + [1] * len(lesion))
            score = np.array([r["lesion_score"] for r in normal + lesion])
            entry["normal_vs_lesion_auroc"] = round(float(roc_auc_score(truth, score)), 4)
            index = {id(r): c for r, c in zip(rows, clusters)}
            both = [index[id(r)] for r in normal + lesion]
            entry["normal_vs_lesion_auroc_ci"] = _interval([
                float(roc_auc_score(truth[pick], score[pick])) for pick in cluster_resamples(both, n_boot)
                if 0 < truth[pick].sum() < len(pick)])
            entry["normal_outlined_empty"] = round(float(np.mean([r["lesion_score"] < 0.5 for r in normal])), 4)
        out[held] = entry
    return out


NAMES = {"busi_dev": "BUSI", "busbra_dev": "BUS-BRA", "uclm_dev": "BUS-UCLM"}


def markdown(metrics: dict, classifier_runs: list[Path]) -> str:
    """Per held-out hospital and rule: what the issue's table asks (normal recall, lesions called normal, normal-vs-
    lesion AUROC, malignant-vs-benign AUROC, sensitivity / specificity at the rule, 3-class accuracy, Dice), each with
    its 95% interval over patients joined with near-duplicates, and the CPU minutes of training behind it."""
    def ci(value, interval, pct=True):
        if value is None:
            return "–"
        f = (lambda v: f"{v:.0%}") if pct else (lambda v: f"{v:.3f}")  # noqa: E731
        return f(value) + (f" [{f(interval[0])}, {f(interval[1])}]" if interval else "")
    out = []
    seg = metrics["segmentation"]
    for run in classifier_runs:
        summary = next(iter(json.loads((run / "cv_metrics.json").read_text()).values()))
        minutes = {}  # a hospital-out fold's test part is its held-out hospital: matched by size
        with open(run / "fold_metrics.csv", newline="") as f:
            for row in csv.DictReader(f):
                minutes[int(row["n_test"])] = float(row["train_seconds"]) / 60
        for key, title in ((f"rule_with_{run.name}", "joint rule (both thresholds fitted together, 90% of the cancers "
                                                      "at every held-out hospital)"),
                           (f"lesion95_rule_with_{run.name}", "last release's fit (lesion threshold for 95% of the "
                                                              "lesions, then the malignant one)")):
            if key not in metrics:
                continue
            rule = metrics[key]["rule"]
            out += [f"**{title}**, on `{run.name}` + its segmenters: lesion threshold {rule['lesion_threshold']:.3f}, "
                    f"p(malignant | lesion) threshold {rule['threshold']:.3f}", "",
                    "| held out | images | normal recall | lesions called normal | normal vs lesion AUROC | "
                    "malignant vs benign AUROC | sensitivity / specificity | 3-class accuracy | Dice | CPU min |",
                    "|---|---|---|---|---|---|---|---|---|---|"]
            for source, f in sorted(metrics[key]["per_held_out_source"].items()):
                r, c = f["lesion_first"], f["lesion_first"].get("ci", {})
                g = seg.get(source, {})
                mvb = (summary["per_source"].get(source) or {}).get("malignant_vs_benign") or {}
                auroc = mvb.get("auroc") or {}
                cpu = f"{minutes.get(f['images'], float('nan')):.0f} + {g.get('train_minutes', float('nan')):.0f}"
                out.append(
                    f"| {NAMES.get(source, source)} | {f['images']} ({g.get('normal_images', 0)} normal) | "
                    f"{ci(r['normal_recall'], c.get('normal_recall'))} | "
                    f"{ci(r['lesions_called_normal'], c.get('lesions_called_normal'))} | "
                    f"{ci(g.get('normal_vs_lesion_auroc'), g.get('normal_vs_lesion_auroc_ci'), False)} | "
                    f"{ci(auroc.get('estimate'), [auroc['ci_low'], auroc['ci_high']] if auroc else None, False)} | "
                    f"{ci(r['sensitivity'], c.get('sensitivity'))} / {ci(r['specificity'], c.get('specificity'))} | "
                    f"{ci(r['accuracy'], c.get('accuracy'), False)} | "
                    f"{ci(g.get('dice_mean'), g.get('dice_ci'), False)} | {cpu} |")
            out.append("")
    return "\n".join(out)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", required=True)
    ap.add_argument("--meta", action="append", default=[])
    ap.add_argument("--patient-column", default="Case")
    ap.add_argument("--config", default=str(ROOT / "configs" / "lesion.yaml"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--classifier-cv", action="append", default=[], help="busi cv --split source run(s) of the classifier")
    ap.add_argument("--folds", type=int, help="cross-validate within the pooled sources with K grouped folds")
    ap.add_argument("--rule-from", type=Path, help="a model's card.json (busi/assets/card.json) or a hospital-out run's "
                    "lesion_metrics.json: apply that rule here instead of fitting one")
    ap.add_argument("--out", required=True)
    ap.add_argument("--reuse", action="store_true", help="score an earlier run's lesion_oof.csv again, no training")
    ap.add_argument("--md", type=Path, help="also write the per-hospital table (markdown) to this file")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.reuse:
        overrides = {"data": args.data, "meta": args.meta, "patient_column": args.patient_column if args.meta else None,
                     "seed": args.seed,
                     "freeze_classifier": True, "val_size": 0.0, "malignant_recall": None,
                     "split": "grouped" if args.folds else "source", **({"folds": args.folds} if args.folds else {})}
        if args.epochs:
            overrides["epochs"] = args.epochs
        cfg = make_config(overrides, args.config)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        rows = segment_out_of_fold(cfg, out)
        with open(out / "lesion_oof.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    rows = read_csv(out / "lesion_oof.csv")
    for r in rows:
        r["lesion_score"] = float(r["lesion_score"])
        r["dice"] = float(r["dice"]) if r["dice"] else None
        r["iou"] = float(r["iou"]) if r["iou"] else None
    clusters = clusters_of(rows, args.meta, args.patient_column,
                           [Path(run) / "audit.json" for run in args.classifier_cv])
    metrics = {"segmentation": summarize(rows, clusters)}
    by_path = dict(zip((r["path"] for r in rows), clusters))
    for run in map(Path, args.classifier_cv):
        probs = {r["path"]: r for r in read_csv(run / "oof_predictions.csv")}
        joined = [(r, probs[r["path"]]) for r in rows if r["path"] in probs]
        classes = ["benign", "malignant", "normal"]
        p = torch.tensor([[float(c[f"p_{k}"]) for k in classes] for _, c in joined])
        y = torch.tensor([classes.index(r["true"]) for r, _ in joined])
        scores = torch.tensor([r["lesion_score"] for r, _ in joined])
        held = [r["source"] if "source" in r else r["held_out"] for r, _ in joined]
        clusters = [by_path[r["path"]] for r, _ in joined]
        if args.rule_from:  # a model's card.json (its stored rule) or a hospital-out run's lesion_metrics.json
            given = json.loads(args.rule_from.read_text())
            rule = given.get("operating_point") or next(v["rule"] for k, v in given.items() if k.startswith("rule_with"))
        else:  # both thresholds fitted together, the recall bound held at every held-out hospital (the bundled fit)
            rule = fit_joint_rule(p, scores, y, classes, malignant_recall=0.9, groups=held,
                                  where="hospital-out out-of-fold predictions")
            rule["tradeoff"] = rule_tradeoff(p, scores, y, classes, held)
            # last release's fit beside it: the lesion threshold for 95% of the lesions, then the malignant one
            before = fit_lesion_rule(p, scores, y, classes, malignant_recall=0.9, lesion_recall=0.95,
                                     where="hospital-out out-of-fold predictions")
            metrics[f"lesion95_rule_with_{run.name}"] = {"rule": before, "per_held_out_source": lesion_rule_figures(
                p, scores, y, classes, before, held, clusters=clusters, n_boot=1000)}
        metrics[f"rule_with_{run.name}"] = {"rule": rule, "per_held_out_source": lesion_rule_figures(
            p, scores, y, classes, rule, held, clusters=clusters, n_boot=1000)}
    (out / "lesion_metrics.json").write_text(json.dumps(metrics, indent=2))
    if args.md:
        args.md.write_text(markdown(metrics, [Path(run) for run in args.classifier_cv]) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
