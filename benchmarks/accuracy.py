"""Cross-validate recipes on a dataset and write the table in benchmarks/accuracy.md.

    python benchmarks/accuracy.py --data ../shared/data/busi_dev --folds 3 benchmarks/recipes/*.yaml configs/recommended.yaml
    python benchmarks/accuracy.py --collect runs/cv-*            # only rebuild the table from finished cv runs

Each recipe runs `busi cv` (grouped by near-duplicates unless the recipe or --split says random) into
runs/accuracy/<recipe>[-<split>]/; the table quotes cv_metrics.json with its cluster-bootstrap 95% CIs.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

from busi.models import IMAGENET_WEIGHTS


def run(recipe: Path, data: str, folds: int, repeats: int, split: str | None, out_root: Path) -> Path:
    out = out_root / (recipe.stem + (f"-{split}" if split else ""))
    if (out / "cv_metrics.json").is_file():
        print(f"{out}: done already, reusing", flush=True)
        return out
    cmd = [sys.executable, "-m", "busi.cli", "cv", "--config", str(recipe), "--data", data, "--folds", str(folds),
           "--repeats", str(repeats), "--out", str(out), "--no-progress", "--overwrite"]
    if split:
        cmd += ["--split", split]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out


def _ci(m: dict) -> str:
    return f"{m['estimate']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"


def table(runs: list[Path]) -> str:
    lines = ["| recipe | model | split | folds × repeats | accuracy | macro-F1 | macro-AUROC | malignant recall | "
             "train s / fold | parameters |", "|---|---|---|---|---|---|---|---|---|---|"]
    for folder in runs:
        summary = json.loads((folder / "cv_metrics.json").read_text())
        config = yaml.safe_load((folder / "config.yaml").read_text())
        for arch, s in summary.items():
            m = s["metrics"]
            members = f" ×{config['ensemble']}" if config.get("ensemble", 1) > 1 else ""
            notes = ", MixUp/CutMix" if config.get("mixup_alpha", 0) or config.get("cutmix_alpha", 0) else ""
            notes += f", seed {config['seed']}" if config.get("seed", 0) else ""
            notes += (", ImageNet weights" if config.get("pretrained")
                      and all(a in IMAGENET_WEIGHTS for a in arch.split("+")) else "")
            if config.get("members"):  # benchmarks/ensemble.py: size and epochs above are the first member's
                notes += (", out-of-fold average of " + " + ".join(f"`{Path(m).name}`" for m in config["members"])
                          + " (`benchmarks/ensemble.py`)")
            if (folder / "roi_oracle.json").is_file():  # benchmarks/roi_ceiling.py: not a recipe anyone can ship
                notes += ", **true-mask lesion crops (ceiling)**"
            lines.append(f"| {folder.name} | {arch}{members} @{config['image_size']}, {config['epochs']} ep{notes} | {s['split']} | "
                         f"{s['folds']} × {s['repeats']} | {_ci(m['accuracy'])} | {_ci(m['macro_f1'])} | {_ci(m['auroc'])} | "
                         f"{_ci(m['recall_malignant']) if 'recall_malignant' in m else '–'} | {s['mean_train_seconds']:.0f} | "
                         f"{s['parameters'] / 1e6:.1f} M |")
    return "\n".join(lines)


def seed_table(runs: list[Path]) -> str:
    """For ensembles: each member (its own training seed) scored alone out of fold, beside the ensemble."""
    lines = ["| recipe | split | members alone: accuracy | macro-F1 | malignant recall | ensemble accuracy |",
             "|---|---|---|---|---|---|"]
    for folder in runs:
        for arch, s in json.loads((folder / "cv_metrics.json").read_text()).items():
            if "members_alone" not in s:
                continue
            alone = s["members_alone"]
            fmt = lambda values: ", ".join(f"{v:.3f}" for v in values)  # noqa: E731
            lines.append(f"| {folder.name} | {s['split']} | {fmt(alone['accuracy'])} | {fmt(alone['macro_f1'])} | "
                         f"{fmt(alone['recall_malignant'])} | {s['metrics']['accuracy']['estimate']:.3f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def operating_point_table(runs: list[Path]) -> str:
    """Out-of-fold decisions at each fold's malignant threshold (set on that fold's validation part)."""
    lines = ["| recipe | target malignant recall | malignant recall | malignant precision | accuracy | thresholds per fold |",
             "|---|---|---|---|---|---|"]
    for folder in runs:
        for arch, s in json.loads((folder / "cv_metrics.json").read_text()).items():
            op = s.get("operating_point")
            if not op or "accuracy" not in op:
                continue
            mal = op["per_class"]["malignant"]
            lines.append(f"| {folder.name} | {op['target_recall']} | {mal['recall']:.3f} | {mal['precision']:.3f} | "
                         f"{op['accuracy']:.3f} | {', '.join(f'{t:.3f}' for t in op['thresholds'])} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", type=Path)
    parser.add_argument("--data")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--split", choices=["grouped", "random"], help="override the recipes' split")
    parser.add_argument("--out-root", type=Path, default=Path("runs/accuracy"))
    parser.add_argument("--collect", nargs="+", type=Path, help="finished cv run folders to tabulate instead")
    args = parser.parse_args()
    if args.collect:
        runs = args.collect
    else:
        if not args.data:
            parser.error("--data is needed to run recipes")
        runs = [run(r, args.data, args.folds, args.repeats, args.split, args.out_root) for r in args.recipes]
    done = [r for r in runs if (r / "cv_metrics.json").is_file()]
    print(table(done))
    operating = operating_point_table(done)
    if operating:
        print("\nAt the operating point (malignant_recall):\n" + operating)
    seeds = seed_table(done)
    if seeds:
        print("\nSeed spread (ensemble members scored alone):\n" + seeds)


if __name__ == "__main__":
    main()
