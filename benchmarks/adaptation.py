"""How many labelled patients of a new hospital are enough: a learning curve of adapting a model trained elsewhere.

    python benchmarks/adaptation.py --direction busi-to-busbra=FOLD_MODEL_A:../shared/data/busbra_dev \
        --direction busbra-to-busi=FOLD_MODEL_B:../shared/data/busi_dev --meta ../shared/data/busbra_dev/bus_data.csv \
        --draws 3 --out runs/adaptation --md benchmarks/adaptation.md --png benchmarks/adaptation.png

Each --direction is NAME=CHECKPOINT:TARGET: a model that never saw TARGET (for instance a fold model of `busi cv
--split source --keep-fold-models`) and the hospital's folder. For each draw the target's patients (--meta's
--patient-column where the CSV names them, else the audit's duplicate groups) are split in half, stratified by
class: a pool to adapt with and a test half that scores every point of that draw. Points, on the test half:
- 0: the model as it is, at its stored threshold;
- label-free: `busi adapt` on the pool's images (no labels), at the stored threshold;
- k labelled patients (nested draws from the pool): `busi calibrate` (threshold re-set on them, no training; only
  where they hold 10 malignant images or more) and `busi finetune` (trained on them; its threshold re-set on its
  validation part when that holds 10 malignant images, else the parent's; refused, so no point, when a class has
  too few images to keep some aside).
AUROC malignant vs benign with 95% CIs resampling test patients; sensitivity and specificity at each point's
threshold; CPU seconds of each point's adaptation.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from busi import checkpoint  # noqa: E402
from busi.adapt import run_adapt, run_calibrate  # noqa: E402
from busi.audit import audit  # noqa: E402
from busi.cli import main as busi  # noqa: E402
from busi.data import load  # noqa: E402
from busi.errors import BusiError  # noqa: E402
from busi.external import malignant_vs_benign, relabel  # noqa: E402
from busi.folders import scan  # noqa: E402
from busi.inference import predict_probs  # noqa: E402
from busi.meta import read_meta  # noqa: E402
from busi.split import group_ids  # noqa: E402
from hospitals import write_table  # noqa: E402  (benchmarks/, the script's own folder)

SIZES = (10, 25, 50, 100, 200)
NAMES = {"auroc": "AUROC", "sensitivity": "sensitivity", "specificity": "specificity"}


def patients_of(dataset, meta: str | None, patient_column: str) -> list[str]:
    """Each image's patient (the meta CSV's column), else its near-duplicate group (BUSI names no patients)."""
    paths = [s.path for s in dataset.samples]
    if meta:
        try:
            rows, _ = read_meta(meta, "ID", [patient_column], paths)
            if len(rows) == len(paths):
                return [rows[p][patient_column] for p in paths]
        except BusiError:
            pass
    groups = group_ids(paths, audit(dataset, progress=False)["duplicate_groups"])
    return [f"group{g}" for g in groups]


def link_folder(dataset, indices, out: Path) -> Path:
    """A folder of links to the chosen images and their masks, in the Kaggle layout (what a user would hand over)."""
    for i in indices:
        sample = dataset.samples[i]
        for rel in (sample.path, *sample.mask_paths):
            link = out / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(dataset.file(rel).resolve())
    return out


def score(ckpt: Path, images, labels, clusters) -> dict:
    model, config = checkpoint.load(ckpt)
    probs = predict_probs(model, config, images)
    mvb = malignant_vs_benign(probs, labels, config["classes"], config.get("operating_point"), clusters)
    op = config.get("operating_point") or {}
    return {"auroc": mvb["auroc"], "sensitivity": mvb.get("sensitivity_operating_point"),
            "specificity": mvb.get("specificity_operating_point"), "threshold": op.get("threshold")}


def direction(name: str, parent: Path, target: Path, meta: str | None, patient_column: str, draws: int, out: Path,
              epochs: int) -> list[dict]:
    parent_config = checkpoint.read(parent)["config"]
    dataset, _ = relabel(scan(target), parent_config["classes"], str(parent))
    patients = np.array(patients_of(dataset, meta, patient_column))
    labels = np.array([s.label for s in dataset.samples])
    results = []
    for draw in range(draws):
        pool_idx, test_idx = next(StratifiedGroupKFold(2, shuffle=True, random_state=draw).split(labels, labels, patients))
        assert not set(patients[pool_idx]) & set(patients[test_idx])
        root = out / name / f"draw{draw}"
        test_images, test_labels, test_ds = load(dataset.subset(test_idx), parent_config["image_size"], False,
                                                 parent_config.get("preprocess", ()))
        kept = {s.path for s in test_ds.samples}
        clusters = [patients[i] for i in test_idx if dataset.samples[i].path in kept]

        def point(kind, k, ckpt, seconds, n_images):
            results.append({"direction": name, "draw": draw, "kind": kind, "patients": k, "images": n_images,
                            "seconds": round(seconds, 1), **score(ckpt, test_images, test_labels, clusters)})
            r = results[-1]
            print(f"{name} draw {draw} {kind} k={k}: AUROC {r['auroc']['estimate']:.3f}, sensitivity "
                  f"{(r['sensitivity'] or {}).get('estimate', float('nan')):.3f} ({seconds:.0f} s)", flush=True)
        point("as shipped", 0, parent, 0.0, 0)
        start = time.perf_counter()
        pool = link_folder(dataset, pool_idx, root / "pool")
        _, adapted = run_adapt(parent, [pool], root / "adapted", overwrite=True)
        point("label-free (adapt)", 0, adapted / "checkpoint.pth", time.perf_counter() - start, len(pool_idx))
        order = np.random.default_rng(draw).permutation(sorted(set(patients[pool_idx])))
        for k in [s for s in SIZES if s < len(order)] + [len(order)]:
            chosen = set(order[:k])
            idx = [i for i in pool_idx if patients[i] in chosen]
            if len(set(labels[idx])) < 2:
                continue
            folder = link_folder(dataset, idx, root / f"k{k}" / "data")
            start = time.perf_counter()
            try:
                _, calibrated = run_calibrate(parent, folder, 0.9, root / f"k{k}" / "calibrated", overwrite=True,
                                              progress=False)
                point("threshold re-set (calibrate)", k, calibrated / "checkpoint.pth", time.perf_counter() - start,
                      len(idx))
            except BusiError as e:  # fewer than 10 malignant images: calibrate refuses, as it should
                print(f"{name} draw {draw} calibrate k={k}: {e}", flush=True)
            start = time.perf_counter()
            tuned = root / f"k{k}" / "finetuned"
            if busi(["finetune", "--checkpoint", str(parent), "--data", str(folder), "--epochs", str(epochs),
                     "--out", str(tuned), "--overwrite", "--no-progress"]) != 0:
                # too few images of a class to keep some aside: finetune refuses (its one-line error is printed above)
                print(f"{name} draw {draw} finetune k={k}: refused", flush=True)
                continue
            point("fine-tuned (finetune)", k, tuned / parent_config["arch"] / "checkpoint.pth",
                  time.perf_counter() - start, len(idx))
    return results


def size_of(r: dict) -> int | str:
    """A point's labelled-patient count, or "all" for the whole pool (its size differs a little between draws)."""
    return r["patients"] if r["patients"] in (0, *SIZES) else "all"


def summarise(results: list[dict]) -> list[str]:
    lines = ["| direction | point | labelled patients | images used | AUROC (mean of draws; each draw's 95% CI) | "
             "sensitivity at its threshold | specificity | CPU s (mean) | draws |", "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["direction"], r["kind"], size_of(r)) for r in results},
                  key=lambda t: (t[0], t[2] if t[2] != "all" else 10**6, ["as shipped", "label-free (adapt)", "threshold re-set (calibrate)",
                                             "fine-tuned (finetune)"].index(t[1])))
    for d, kind, k in keys:
        rs = [r for r in results if (r["direction"], r["kind"], size_of(r)) == (d, kind, k)]
        if k == "all":
            k = f"all of the pool ({np.mean([r['patients'] for r in rs]):.0f})"
        auc = np.mean([r["auroc"]["estimate"] for r in rs])
        cis = "; ".join(f"[{r['auroc']['ci_low']:.2f}, {r['auroc']['ci_high']:.2f}]" for r in rs if r["auroc"]["ci_low"] is not None)
        sens = [r["sensitivity"]["estimate"] for r in rs if r["sensitivity"]]
        spec = [r["specificity"]["estimate"] for r in rs if r["specificity"]]
        lines.append(f"| {d} | {kind} | {k} | {np.mean([r['images'] for r in rs]):.0f} | {auc:.3f} ({cis}) | "
                     f"{np.mean(sens):.3f} | {np.mean(spec):.3f} | {np.mean([r['seconds'] for r in rs]):.0f} | {len(rs)} |"
                     if sens else f"| {d} | {kind} | {k} | {np.mean([r['images'] for r in rs]):.0f} | {auc:.3f} ({cis}) | – | – | "
                     f"{np.mean([r['seconds'] for r in rs]):.0f} | {len(rs)} |")
    return lines


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    directions = sorted({r["direction"] for r in results})
    fig, axes = plt.subplots(1, len(directions), figsize=(6 * len(directions), 4.2), squeeze=False)
    for ax, d in zip(axes[0], directions):
        for kind, style in (("fine-tuned (finetune)", "o-"), ("threshold re-set (calibrate)", "s--")):
            groups = {}
            for r in results:
                if r["direction"] == d and r["kind"] == kind:
                    groups.setdefault(size_of(r), []).append(r)
            sizes = sorted(groups, key=lambda k: np.mean([r["patients"] for r in groups[k]]))
            ks = [np.mean([r["patients"] for r in groups[k]]) for k in sizes]
            for metric, color in (("auroc", "C0"), ("sensitivity", "C3"), ("specificity", "C2")):
                ys = [np.mean([r[metric]["estimate"] for r in groups[k] if r[metric]]) for k in sizes]
                if ks and (kind.startswith("fine") or metric != "auroc"):  # re-setting a threshold moves no AUROC
                    ax.plot(ks, ys, style, color=color, label=f"{NAMES[metric]}, {kind.split(' (')[0]}")
        for kind, marker in (("as shipped", "x"), ("label-free (adapt)", "^")):
            rs = [r for r in results if r["direction"] == d and r["kind"] == kind]
            for metric, color in (("auroc", "C0"), ("sensitivity", "C3"), ("specificity", "C2")):
                vals = [r[metric]["estimate"] for r in rs if r[metric]]
                if vals:
                    ax.plot([1], [np.mean(vals)], marker, color=color, ms=9, label=f"{NAMES[metric]}, {kind}")
        ax.axhline(0.85, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set(title=d, xlabel="labelled patients of the new hospital (0 shown at 1)", ylabel="on its other patients",
               ylim=(0.0, 1.0))
        ax.grid(alpha=0.3)
    fig.legend(*axes[0][-1].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=4, fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--direction", action="append", default=[], help="NAME=CHECKPOINT:TARGET_FOLDER")
    parser.add_argument("--meta", help="CSV naming each image's patient (BUS-BRA's bus_data.csv)")
    parser.add_argument("--patient-column", default="Case")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8, help="fine-tuning epochs (busi finetune's default: 8)")
    parser.add_argument("--out", type=Path, default=Path("runs/adaptation"))
    parser.add_argument("--md", type=Path)
    parser.add_argument("--png", type=Path)
    parser.add_argument("--previous", type=Path, help="a results.json of this script: its directions not named by "
                                                      "--direction are kept in the table (to finish an interrupted run; "
                                                      "alone, it redraws the table and the plot)")
    args = parser.parse_args()
    if not args.direction and not args.previous:
        parser.error("name at least one --direction (or --previous to redraw a table)")
    torch.set_num_threads(torch.get_num_threads())
    names = {spec.split("=", 1)[0] for spec in args.direction}
    results = [r for r in json.loads(args.previous.read_text()) if r["direction"] not in names] if args.previous else []
    for spec in args.direction:
        name, rest = spec.split("=", 1)
        parent, target = rest.split(":", 1)
        results += direction(name, Path(parent), Path(target), args.meta, args.patient_column, args.draws, args.out,
                             args.epochs)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    lines = summarise(results)
    print("\n".join(lines))
    if args.png:
        plot(results, args.png)
    if args.md:
        write_table(args.md, lines)


if __name__ == "__main__":
    main()
