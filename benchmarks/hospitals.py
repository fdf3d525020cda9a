"""The hospital-out table: each candidate recipe cross-validated with `busi cv --split source`, one row per held-out source.

    python benchmarks/hospitals.py --meta ../shared/data/busbra_dev/bus_data.csv \
        --run baseline=benchmarks/results/hospitals-baseline --run windows=benchmarks/results/hospitals-windows …

Each --run is NAME=CV_RUN, a `busi cv --split source` folder (two or more sources, each held out in turn); runs with
the same NAME (other --seed) are listed together and their spread reported. Figures are recomputed from the run's
oof_predictions.csv: malignant vs benign AUROC with 95% CIs resampling patients (from --meta, matched by file name)
merged with the run's near-duplicate groups, malignant sensitivity at each fold model's own threshold (set on its validation part),
3-class accuracy and normal recall where the held-out source has normal images and the training sources taught
'normal'; the same after label-free BatchNorm adaptation to the held-out source (adapted_p_* columns), and the
share of held-out images each fold model called unlike its training images.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from busi.external import malignant_vs_benign  # noqa: E402
from busi.meta import read_meta  # noqa: E402
from busi.split import group_ids  # noqa: E402

CLASSES = ["benign", "malignant", "normal"]


def rows_of(run: Path) -> list[dict]:
    with open(run / "oof_predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def held_out_figures(rows: list[dict], patients: dict, prefix: str = "p_") -> dict:
    """One held-out source's figures from its out-of-fold rows (prefix p_ plain, adapted_p_ after adaptation)."""
    probs = torch.tensor([[float(r[f"{prefix}{c}"]) for c in CLASSES] for r in rows])
    labels = torch.tensor([CLASSES.index(r["true"]) for r in rows])
    clusters = [patients.get(r["path"]) or f"image:{r['path']}" for r in rows]  # patients, else duplicate groups
    op = None
    if rows[0].get("threshold"):
        op = {"class": "malignant", "threshold": float(rows[0]["threshold"])}
    mvb = malignant_vs_benign(probs, labels, CLASSES, op, clusters, cluster_kind="patients")
    out = {"n": len(rows), "auroc": mvb["auroc"], "n_clusters": mvb["n_clusters"],
           "sensitivity": (mvb.get("sensitivity_operating_point") or {}).get("estimate"),
           "specificity": (mvb.get("specificity_operating_point") or {}).get("estimate"),
           "sensitivity_argmax": mvb["sensitivity_argmax"]["estimate"]}
    normal = labels == CLASSES.index("normal")
    if normal.any():
        out["accuracy"] = float((probs.argmax(1) == labels).float().mean())
        out["normal_recall"] = float((probs[normal].argmax(1) == CLASSES.index("normal")).float().mean())
    if rows[0].get("outside_training", "") != "":
        out["flagged"] = float(np.mean([r["outside_training"] == "1" for r in rows]))
    return out


def figures(run: Path, patients: dict) -> dict:
    """{held-out source: {"plain": …, "adapted": …, "train_seconds": …}} of one `busi cv --split source` run."""
    rows = rows_of(run)
    folds = {r["fold"]: r["path"].split("/", 1)[0] for r in rows}
    seconds = {row["fold"]: float(row["train_seconds"]) for row in csv.DictReader(open(run / "fold_metrics.csv"))}
    summary = next(iter(json.loads((run / "cv_metrics.json").read_text()).values()))
    out = {}
    for fold, source in sorted(folds.items(), key=lambda kv: kv[1]):
        mine = [r for r in rows if r["fold"] == fold]
        saved = summary["per_source"][source]
        out[source] = {"plain": held_out_figures(mine, patients),
                       "adapted": held_out_figures(mine, patients, "adapted_p_") if "adapted_p_benign" in mine[0] else None,
                       "untrained": saved.get("untrained_classes", []), "train_seconds": seconds[fold]}
        if out[source]["plain"]["sensitivity"] is None and saved.get("operating_point"):  # runs before the CSV had them
            op = saved["operating_point"]
            benign = op["confusion_matrix"][CLASSES.index("benign")]
            out[source]["plain"]["sensitivity"] = op["per_class"]["malignant"]["recall"]
            out[source]["plain"]["specificity"] = 1 - benign[CLASSES.index("malignant")] / max(1, sum(benign))
        if out[source]["adapted"] is None and saved.get("adapted"):
            a = saved["adapted"]
            out[source]["adapted"] = {"auroc": a["malignant_vs_benign"]["auroc"],
                                      "sensitivity": (a.get("operating_point") or {}).get("per_class", {})
                                      .get("malignant", {}).get("recall")}
    return out


def _f(v, digits=3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def table(results: dict[str, list[tuple[Path, dict]]]) -> list[str]:
    lines = ["| recipe (runs) | held out | images (patients) | AUROC malignant vs benign [95% CI] | sensitivity at the "
             "fold's threshold (specificity) | 3-class accuracy | normal recall | AUROC, sensitivity after `busi adapt` "
             "| flagged unlike training | train min per fold |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        sources = sorted({s for _, r in runs for s in r})
        for source in sources:
            per_run = [r[source] for _, r in runs if source in r]
            plain = [p["plain"] for p in per_run]
            auc = [p["auroc"]["estimate"] for p in plain]
            first = plain[0]
            ci = f"[{first['auroc']['ci_low']:.3f}, {first['auroc']['ci_high']:.3f}]" if first["auroc"]["ci_low"] is not None else ""
            spread = (" / ".join(f"{a:.3f}" for a in auc) + f" (seeds); {ci} seed 0") if len(auc) > 1 else f"{auc[0]:.3f} {ci}"
            sens = " / ".join(f"{_f(p['sensitivity'])} ({_f(p['specificity'])})" for p in plain)
            untrained = per_run[0]["untrained"]
            acc = " / ".join(_f(p.get("accuracy")) for p in plain) if not untrained else "not trained on " + ", ".join(untrained)
            normal = " / ".join(_f(p.get("normal_recall")) for p in plain) if not untrained else "–"
            adapted = [p["adapted"] for p in per_run if p["adapted"]]
            adapt = " / ".join(f"{a['auroc']['estimate']:.3f}, {_f(a['sensitivity'])}" for a in adapted) or "–"
            flagged = " / ".join(f"{p['flagged']:.0%}" for p in plain if "flagged" in p) or "–"
            minutes = " / ".join(f"{p['train_seconds'] / 60:.1f}" for p in per_run)
            lines.append(f"| {name} ({len(runs)}) | {source} | {first['n']} ({first['n_clusters']}) | {spread} | {sens} | "
                         f"{acc} | {normal} | {adapt} | {flagged} | {minutes} |")
    return lines


def joint_rule_lines(rows: list[dict], clusters: dict) -> list[str]:
    """busi.operating.fit_joint_rule on hospital-out predictions, 1 - p(normal) standing in for the segmenter's lesion
    score: the recall bound held at every held-out hospital, then the most normal scans called normal and benign
    lesions benign; per hospital, what it does (95% intervals over patients joined with near-duplicates)."""
    from busi.operating import fit_joint_rule, lesion_rule_figures
    probs = torch.tensor([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])
    labels = torch.tensor([CLASSES.index(r["true"]) for r in rows])
    held = [r["path"].split("/", 1)[0] for r in rows]
    score = 1 - probs[:, CLASSES.index("normal")]
    rule = fit_joint_rule(probs, score, labels, CLASSES, 0.9, groups=held, where="hospital-out predictions")
    per = lesion_rule_figures(probs, score, labels, CLASSES, rule, held,
                              clusters=[clusters[r["path"]] for r in rows], n_boot=1000)
    out = [f"thresholds: normal when p(normal) > {1 - rule['lesion_threshold']:.3f}; malignant when p(malignant | "
           f"lesion) >= {rule['threshold']:.3f}",
           "| held out | images | normal recall | lesions called normal | sensitivity / specificity | 3-class accuracy |",
           "|---|---|---|---|---|---|"]
    for source, f in sorted(per.items()):
        r, c = f["lesion_first"], f["lesion_first"]["ci"]

        def show(k, pct=True):
            if r[k] is None:
                return "–"
            fmt = (lambda v: f"{v:.0%}") if pct else (lambda v: f"{v:.3f}")  # noqa: E731
            return fmt(r[k]) + (f" [{fmt(c[k][0])}, {fmt(c[k][1])}]" if k in c else "")
        out.append(f"| {source} | {f['images']} | {show('normal_recall')} | {show('lesions_called_normal')} | "
                   f"{show('sensitivity')} / {show('specificity')} | {show('accuracy', False)} |")
    return out


def write_table(md: Path, lines: list[str]) -> None:
    """The table into md between its <!-- table --> markers (a new file is just the table), the prose kept."""
    text = md.read_text() if md.is_file() else "<!-- table -->\n<!-- /table -->\n"
    start, end = text.index("<!-- table -->"), text.index("<!-- /table -->")
    md.write_text(text[:start] + "<!-- table -->\n" + "\n".join(lines) + "\n" + text[end:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="NAME=CV_RUN (a busi cv --split source folder)")
    parser.add_argument("--meta", action="append", default=[], help="meta CSV with patients (e.g. BUS-BRA's bus_data.csv)")
    parser.add_argument("--patient-column", default="Case")
    parser.add_argument("--md", type=Path, help="write the table into this markdown file, between its table markers")
    parser.add_argument("--joint-rule", action="store_true", help="also fit busi's joint lesion-first rule on each "
                        "run's hospital-out predictions with the classifier's own 1 - p(normal) as the lesion score "
                        "(no segmenter): what it does per held-out hospital, with patient intervals")
    args = parser.parse_args()
    results: dict[str, list] = {}
    for spec in args.run:
        name, path = spec.split("=", 1)
        run = Path(path)
        paths = [r["path"] for r in rows_of(run)]
        patients = {}
        for meta in args.meta:  # rows matched by file name within the source that holds them
            for source in sorted({p.split("/", 1)[0] for p in paths}):
                mine = [p for p in paths if p.startswith(source + "/")]
                try:
                    found, _ = read_meta(meta, "ID", [args.patient_column], mine)
                except Exception:
                    continue
                patients.update({p: f"{source}:{v[args.patient_column]}" for p, v in found.items()})
        # what stays together: a patient's images (meta) and near-duplicate groups (the run's audit), merged
        groups = json.loads((run / "audit.json").read_text())["duplicate_groups"]
        by_patient: dict[str, list[str]] = {}
        for path, patient in patients.items():
            by_patient.setdefault(patient, []).append(path)
        ids = group_ids(paths, groups, list(by_patient.values()))
        clusters = {p: f"cluster{i}" for p, i in zip(paths, ids)}
        results.setdefault(name, []).append((run, figures(run, clusters)))
        if args.joint_rule:
            print(f"\n{name} ({run.name}): the joint rule on the classifier alone\n" + "\n".join(
                joint_rule_lines(rows_of(run), clusters)) + "\n")
    lines = table(results)
    print("\n".join(lines))
    if args.md:
        write_table(args.md, lines)


if __name__ == "__main__":
    main()
