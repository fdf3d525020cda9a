"""Ensembles of cross-validated recipes scored out of fold, without training: their `busi cv` predictions averaged.

    python benchmarks/ensemble.py --data ../shared/data/busi_dev --meta ../shared/data/busbra_dev/bus_data.csv \
        --member benchmarks/results/external-baseline --member benchmarks/results/lite2-224 \
        --out benchmarks/results/ensemble-lite0-lite2

Members are `busi cv` folders of the same data, split, seed, folds and repeats, and the script checks that every image
sat in the same fold of each, so every image is still scored only by models that never saw it: the row is what a CV of
"train each recipe on the fold, average the probabilities" gives, at no training cost. Where every member ran with
--external, their fold-averaged external probabilities are averaged as well (argmax figures only: the members'
operating points differ). --data is the folder the members cross-validated (for its duplicate groups, which the
bootstrap resamples). The folder written has the layout of a `busi cv` run, so `benchmarks/accuracy.py --collect` and
`benchmarks/external.py --cv` take it as one more row.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

from busi.audit import audit
from busi.crossval import write_csv
from busi.data import scan
from busi.metrics import bootstrap_ci, compute_metrics
from busi.external import figures
from busi.split import group_ids

SAME = ("split", "seed", "folds", "repeats")  # what makes two cv runs' folds comparable


def read_rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


def probs_of(rows: dict[str, dict], paths: list[str], classes: list[str]) -> torch.Tensor:
    return torch.tensor([[float(rows[p][f"p_{c}"]) for c in classes] for p in paths])


def check_members(members: list[Path]) -> tuple[list[dict], list[dict[str, dict]]]:
    configs = [yaml.safe_load((m / "config.yaml").read_text()) for m in members]
    oofs = [read_rows(m / "oof_predictions.csv") for m in members]
    for m, config, oof in zip(members[1:], configs[1:], oofs[1:]):
        differ = [k for k in SAME if config.get(k) != configs[0].get(k)]
        if differ:
            raise SystemExit(f"{m}: its {', '.join(differ)} differ from {members[0]}'s: not the same folds")
        if set(oof) != set(oofs[0]):
            raise SystemExit(f"{m}: scores other images than {members[0]}")
        moved = [p for p in oof if (oof[p]["repeat"], oof[p]["fold"]) != (oofs[0][p]["repeat"], oofs[0][p]["fold"])]
        if moved:
            raise SystemExit(f"{m}: {len(moved)} image(s) in another fold than in {members[0]} (e.g. {moved[0]})")
    return configs, oofs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--member", action="append", type=Path, required=True, help="a `busi cv` folder (two or more)")
    parser.add_argument("--data", required=True, help="the dataset the members cross-validated")
    parser.add_argument("--meta", help="the external folder's CSV (ID, Case, Device), for patient CIs and per-scanner rows")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if len(args.member) < 2:
        parser.error("give two or more --member folders")
    configs, oofs = check_members(args.member)
    summaries = [json.loads((m / "cv_metrics.json").read_text()) for m in args.member]
    arches = [next(iter(s)) for s in summaries]
    blocks = [s[a] for s, a in zip(summaries, arches)]  # each member's one model
    classes = [k[2:] for k in next(iter(oofs[0].values())) if k.startswith("p_")]
    paths = sorted(oofs[0])
    labels = torch.tensor([classes.index(oofs[0][p]["true"]) for p in paths])
    probs = torch.stack([probs_of(oof, paths, classes) for oof in oofs]).mean(0)

    dataset = scan(args.data)
    groups = group_ids(paths, audit(dataset)["duplicate_groups"])
    first = blocks[0]
    name = "+".join(arches)
    summary = {
        "model": name, "members": [str(m) for m in args.member], "folds": first["folds"], "repeats": first["repeats"],
        "split": first["split"], "n_images": len(paths), "n_predictions": len(paths),
        "parameters": sum(b["parameters"] for b in blocks),
        "mean_train_seconds": sum(b["mean_train_seconds"] for b in blocks),
        "ci_method": "95% percentile bootstrap over duplicate groups of the averaged out-of-fold predictions "
                     "(1000 resamples)",
        "metrics": bootstrap_ci(probs, labels, groups, classes, n_boot=1000, seed=0),
        "pooled": compute_metrics(probs, labels, classes),
        "note": "members' out-of-fold probabilities averaged; no temperature or operating point of its own",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [{"model": name, "repeat": oofs[0][p]["repeat"], "fold": oofs[0][p]["fold"], "path": p,
             "true": classes[int(t)], **{f"p_{c}": round(float(v), 6) for c, v in zip(classes, row)}}
            for p, t, row in zip(paths, labels, probs)]
    write_csv(args.out / "oof_predictions.csv", rows)

    externals = [m / "external_predictions.csv" for m in args.member]
    if all(e.is_file() for e in externals):
        ext = [read_rows(e) for e in externals]
        ext_paths = sorted(ext[0])
        if any(set(e) != set(ext_paths) for e in ext[1:]):
            raise SystemExit("the members' external predictions cover other images")
        ext_probs = torch.stack([probs_of(e, ext_paths, classes) for e in ext]).mean(0)
        ext_labels = torch.tensor([classes.index(ext[0][p]["true"]) for p in ext_paths])
        ext_cfg = first["external"]
        meta = args.meta and Path(args.meta)
        found = figures(ext_probs, {"classes": classes, "operating_point": None}, ext_labels,
                        SimpleNamespace(samples=[SimpleNamespace(path=p) for p in ext_paths]), meta,
                        configs[0].get("external_id_column") or "ID", configs[0].get("external_group_column"),
                        configs[0].get("external_patient_column"))
        summary["external"] = {"data": ext_cfg["data"], "n": len(ext_paths), "absent_classes": ext_cfg["absent_classes"],
                               "method": "each member's fold-averaged probabilities, averaged over the members",
                               "operating_point": None, **found}
        write_csv(args.out / "external_predictions.csv",
                   [{"path": p, "true": classes[int(t)], **{f"p_{c}": round(float(v), 6) for c, v in zip(classes, row)}}
                    for p, t, row in zip(ext_paths, ext_labels, ext_probs)])
    (args.out / "cv_metrics.json").write_text(json.dumps({name: summary}, indent=2))
    config = {**configs[0], "members": [str(m) for m in args.member], "models": arches}
    (args.out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    m = summary["metrics"]
    line = (f"{name}: accuracy {m['accuracy']['estimate']:.3f} [{m['accuracy']['ci_low']:.3f}, "
            f"{m['accuracy']['ci_high']:.3f}], macro-F1 {m['macro_f1']['estimate']:.3f}")
    auroc = (summary.get("external") or {}).get("malignant_vs_benign", {}).get("auroc")
    if auroc:
        line += f"; external AUROC {auroc['estimate']:.3f}" + (
            f" [{auroc['ci_low']:.3f}, {auroc['ci_high']:.3f}]" if auroc["ci_low"] is not None else " (too few for an interval)")
    print(line)


if __name__ == "__main__":
    main()
