"""What adding a few hundred of your own images buys: BUSI pooled with half of another hospital's patients.

    python benchmarks/pooling.py --busi ../shared/data/busi_dev --hospital ../shared/data/busbra_dev \
        --meta ../shared/data/busbra_dev/bus_data.csv --md benchmarks/pooling.md

The hospital's patients (--patient-column, BUS-BRA's Case) are split in two halves, stratified by class; the first
half joins BUSI as a second source (`busi train --data BUSI --data HALF_A`), the second half tests. The same half is
scored by a model trained on BUSI alone (--busi-only, default the bundled model, the same recipe), so the two rows
differ only by the pooled images. Both halves are folders of links under --out-root; nothing is copied.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from busi.folders import scan  # noqa: E402


def split_by_patient(data: Path, meta: Path, id_column: str, patient_column: str, out: Path, seed: int) -> dict:
    """Two folders of links, half_a/ and half_b/, holding every image (and its masks) of one half of the patients."""
    dataset = scan(data)
    with open(meta, newline="", encoding="utf-8-sig") as f:
        patient = {row[id_column]: row[patient_column] for row in csv.DictReader(f)}
    stems = [Path(s.path).stem for s in dataset.samples]
    missing = [s for s in stems if s not in patient]
    if missing:
        raise SystemExit(f"{meta}: no {patient_column} for {len(missing)} image(s), e.g. {missing[0]}")
    labels = np.array([s.label for s in dataset.samples])
    groups = np.array([patient[s] for s in stems])
    train_idx, test_idx = next(StratifiedGroupKFold(2, shuffle=True, random_state=seed).split(labels, labels, groups))
    halves = {"half_a": train_idx, "half_b": test_idx}
    for name, idx in halves.items():
        for i in idx:
            sample = dataset.samples[i]
            for rel in (sample.path, *sample.mask_paths):
                link = out / name / rel
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    link.symlink_to(dataset.file(rel).resolve())
    assert not set(groups[train_idx]) & set(groups[test_idx])
    return {name: {"images": int(len(idx)), "patients": int(len(set(groups[idx]))),
                   "malignant": int((labels[idx] == dataset.classes.index("malignant")).sum())}
            for name, idx in halves.items()}


def reference_on(cv_run: Path, half: Path, patient: dict[str, str]) -> dict:
    """malignant_vs_benign of a cv run's external_predictions.csv on the images of half, CIs over patients."""
    import torch

    from busi.external import malignant_vs_benign
    arch_dir = next(cv_run.rglob("external_predictions.csv"))  # in <model>/ of a run folder, flat in results/
    wanted = {p.relative_to(half).as_posix() for p in half.rglob("*.png") if "_mask" not in p.name}
    with open(arch_dir, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["path"] in wanted]
    classes = [k[2:] for k in rows[0] if k.startswith("p_")]
    probs = torch.tensor([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    labels = torch.tensor([classes.index(r["true"]) for r in rows])
    clusters = [patient[Path(r["path"]).stem] for r in rows]
    return {"malignant_vs_benign": malignant_vs_benign(probs, labels, classes, clusters=clusters), "accuracy": None}


def run(cmd: list[str]) -> None:
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busi", required=True, help="BUSI folder (busi_dev)")
    parser.add_argument("--hospital", required=True, help="the other hospital's folder (busbra_dev)")
    parser.add_argument("--meta", required=True, help="its CSV with an image id and a patient column")
    parser.add_argument("--id-column", default="ID")
    parser.add_argument("--patient-column", default="Case")
    parser.add_argument("--group-column", default="Device")
    parser.add_argument("--config", default=str(ROOT / "configs" / "recommended.yaml"))
    parser.add_argument("--busi-only", default=str(ROOT / "busi" / "assets" / "recommended.pth"),
                        help="a model of the same recipe trained on BUSI alone (default: the bundled model)")
    parser.add_argument("--reference-cv", type=Path, help="a `busi cv --external HOSPITAL` run of BUSI alone: its fold "
                        "models' averaged predictions on half B make another BUSI-alone row (other trainings than --busi-only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-root", type=Path, default=Path("runs/pooling"))
    parser.add_argument("--md", type=Path)
    args = parser.parse_args()

    out = args.out_root
    sizes = split_by_patient(Path(args.hospital), Path(args.meta), args.id_column, args.patient_column, out, args.seed)
    pooled = out / "pooled"
    if not (pooled / "report.html").is_file():
        start = time.perf_counter()
        run([sys.executable, "-m", "busi.cli", "train", "--config", args.config, "--data", args.busi, "--data",
             str(out / "half_a"), "--out", str(pooled), "--overwrite", "--no-progress"])
        (out / "pooled_seconds.txt").write_text(f"{time.perf_counter() - start:.0f}\n")
    arch = next(p.parent.name for p in pooled.glob("*/checkpoint.pth"))
    rows = []
    for name, ckpt in (("BUSI alone", args.busi_only), ("BUSI + half A", str(pooled / arch / "checkpoint.pth"))):
        ev = out / ("eval-" + name.replace(" ", "-").replace("+", "plus"))
        if not (ev / "metrics.json").is_file():
            run([sys.executable, "-m", "busi.cli", "evaluate", "--checkpoint", ckpt, "--data", str(out / "half_b"),
                 "--meta", args.meta, "--id-column", args.id_column, "--patient-column", args.patient_column,
                 "--group-column", args.group_column, "--out", str(ev), "--overwrite", "--no-progress"])
        rows.append((name, json.loads((ev / "metrics.json").read_text())))

    if args.reference_cv:
        with open(args.meta, newline="", encoding="utf-8-sig") as f:
            patient = {r[args.id_column]: r[args.patient_column] for r in csv.DictReader(f)}
        rows.append(("BUSI alone (the CV's fold models averaged)", reference_on(args.reference_cv, out / "half_b", patient)))

    def ci(v):
        if not v:
            return "–"
        if v.get("ci_low") is None:  # fewer than 20 images or 10 patients: busi gives no interval
            return f"{v['estimate']:.3f} (too few for an interval)"
        return f"{v['estimate']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]"
    lines = ["| trained on | half B: AUROC, malignant vs benign | sensitivity / specificity (argmax) | "
             "sensitivity / specificity (operating point) | accuracy | AUROC per scanner |", "|---|---|---|---|---|---|"]
    for name, m in rows:
        mvb = m["malignant_vs_benign"]
        groups = "; ".join(f"{g.split(' @')[0]} {v['malignant_vs_benign']['auroc']['estimate']:.2f} (n={v['n']})"
                           for g, v in (m.get("per_group") or {}).items()
                           if v.get("malignant_vs_benign") and v["malignant_vs_benign"].get("auroc"))
        op = (f"{ci(mvb.get('sensitivity_operating_point'))} / {ci(mvb.get('specificity_operating_point'))}"
              if mvb.get("sensitivity_operating_point") else "–")
        acc = "–" if m.get("accuracy") is None else f"{m['accuracy']:.3f}"
        lines.append(f"| {name} | {ci(mvb['auroc'])} | {ci(mvb['sensitivity_argmax'])} / {ci(mvb['specificity_argmax'])} "
                     f"| {op} | {acc} | {groups or '–'} |")
    text = "\n".join(lines)
    print(text)
    if args.md:
        halves = "; ".join(f"{k}: {v['images']} images of {v['patients']} patients ({v['malignant']} malignant)"
                           for k, v in sizes.items())
        args.md.write_text(f"# Pooling another hospital's images with BUSI ({time.strftime('%Y-%m-%d')})\n\n"
                           f"Command: `python benchmarks/pooling.py {' '.join(sys.argv[1:])}`\n\n"
                           f"Halves split by patient ({args.patient_column}), seed {args.seed}: {halves}.\n\n{text}\n")


if __name__ == "__main__":
    main()
