"""BUSI cross-validation beside another hospital's images: how far a model's BUSI figures travel.

    python benchmarks/external.py --data ../shared/data/busbra_dev --meta ../shared/data/busbra_dev/bus_data.csv \
        --model recommended=runs/recommended/efficientnet-lite0/checkpoint.pth:benchmarks/results/recommended \
        --md benchmarks/external.md

Each --model is NAME=CHECKPOINT:CV_RUN — a model trained on busi_dev alone, and the `busi cv` folder of the same
recipe. The checkpoint runs `busi evaluate` on --data (scanner and patient columns from --meta) into
runs/external/NAME/; the table sets the CV's malignant-vs-benign AUROC (out of fold, same score) beside it.

Each --cv is NAME=CV_RUN — a `busi cv --external …` folder: its fold models' averaged probabilities on the external
folder make the row, so one cross-validation gives both columns (how experiments are compared):

    python benchmarks/external.py --cv baseline=runs/cv-baseline --cv overlays=runs/cv-overlays --md benchmarks/external.md
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import torch
from torchmetrics.functional.classification import binary_auroc


def busi_cv_auroc(cv_run: Path) -> float | None:
    """Out-of-fold AUROC of p(mal)/(p(mal)+p(ben)) on BUSI's benign and malignant images, from oof_predictions.csv."""
    path = cv_run / "oof_predictions.csv"
    if not path.is_file():
        return None
    score, truth = [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["true"] in ("benign", "malignant"):
                p_mal, p_ben = float(row["p_malignant"]), float(row["p_benign"])
                score.append(p_mal / max(p_mal + p_ben, 1e-12))
                truth.append(row["true"] == "malignant")
    return float(binary_auroc(torch.tensor(score), torch.tensor(truth).long()))


def evaluate(name: str, ckpt: str, data: str, meta: str | None, out_root: Path) -> dict:
    out = out_root / name
    if not (out / "metrics.json").is_file():
        cmd = [sys.executable, "-m", "busi.cli", "evaluate", "--checkpoint", ckpt, "--data", data, "--out", str(out),
               "--overwrite", "--no-progress"]
        if meta:
            cmd += ["--meta", meta, "--id-column", "ID", "--group-column", "Device", "--patient-column", "Case"]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return json.loads((out / "metrics.json").read_text())


def _ci(v) -> str:
    if not v:
        return "–"
    if v.get("ci_low") is None:  # fewer than 20 images or 10 patients: busi gives no interval
        return f"{v['estimate']:.3f} (too few for an interval)"
    return f"{v['estimate']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]"


def cv_external(cv_run: Path) -> dict:
    """The external block of a `busi cv --external` run (the first model's): fold-averaged figures."""
    cv = json.loads((cv_run / "cv_metrics.json").read_text())
    block = next(iter(cv.values())).get("external")
    if not block:
        raise SystemExit(f"{cv_run}: this cv run had no --external folder")
    return block


def table(rows: list[tuple[str, Path, dict]]) -> str:
    lines = ["| model | BUSI CV accuracy | BUSI CV macro-F1 | BUSI CV AUROC, malignant vs benign "
             "| external AUROC, malignant vs benign | sensitivity / specificity (argmax) "
             "| sensitivity / specificity (operating point) | AUROC per scanner |",
             "|---|---|---|---|---|---|---|---|"]
    for name, cv_run, m in rows:
        cv = json.loads((cv_run / "cv_metrics.json").read_text()) if (cv_run / "cv_metrics.json").is_file() else {}
        acc = next((_ci(s["metrics"]["accuracy"]) for s in cv.values()), "–")
        f1 = next((_ci(s["metrics"]["macro_f1"]) for s in cv.values()), "–")
        cv_auroc = busi_cv_auroc(cv_run)
        mvb = m["malignant_vs_benign"]
        at = lambda k: (f"{_ci(mvb.get(f'sensitivity_{k}'))} / {_ci(mvb.get(f'specificity_{k}'))}"  # noqa: E731
                        if mvb.get(f"sensitivity_{k}") else "–")
        groups = "; ".join(f"{g.split(' @')[0]} {v['malignant_vs_benign']['auroc']['estimate']:.2f} (n={v['n']})"
                           for g, v in (m.get("per_group") or {}).items()
                           if v.get("malignant_vs_benign") and v["malignant_vs_benign"].get("auroc"))
        lines.append(f"| {name} | {acc} | {f1} | {'–' if cv_auroc is None else f'{cv_auroc:.3f}'} | {_ci(mvb['auroc'])} | "
                     f"{at('argmax')} | {at('operating_point')} | {groups or '–'} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="the external folder (benign/ and malignant/), for --model")
    parser.add_argument("--meta", help="its CSV: ID, Case (patient) and Device (scanner) columns, as BUS-BRA's")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=CHECKPOINT:CV_RUN")
    parser.add_argument("--cv", action="append", default=[], metavar="NAME=CV_RUN",
                        help="a `busi cv --external` run: its fold models averaged make the row")
    parser.add_argument("--out-root", type=Path, default=Path("runs/external"))
    parser.add_argument("--md", type=Path, help="also write the table here")
    args = parser.parse_args()
    if args.model and not args.data:
        parser.error("--model needs --data")
    rows = []
    for spec in args.cv:
        name, _, cv_run = spec.partition("=")
        rows.append((name, Path(cv_run), cv_external(Path(cv_run))))
    for spec in args.model:
        name, _, rest = spec.partition("=")
        ckpt, _, cv_run = rest.partition(":")
        rows.append((name, Path(cv_run), evaluate(name, ckpt, args.data, args.meta, args.out_root)))
    text = table(rows)
    print(text)
    if args.md:
        import time
        args.md.write_text(f"# External evaluation ({time.strftime('%Y-%m-%d')})\n\nCommand: `python benchmarks/external.py "
                           + " ".join(sys.argv[1:]) + "`\n\n" + text + "\n")


if __name__ == "__main__":
    main()
