"""Which lesion-first rule serves both the hospitals a model trained on and one it never saw? Three fits of the two
thresholds, each scored at home and at a new hospital, from runs already made (no training).

    python benchmarks/guarded_rule.py --classifier-cv benchmarks/results/hospitals3-recommended \
        --new benchmarks/results/lesion3-hospitals --home benchmarks/results/lesion3-home --md TABLE.md

Rows: every image twice, "new" (its lesion score from a segmenter that never saw its hospital: benchmarks/lesion.py
hospital-out) and "home" (from a segmenter cross-validated within the pooled sources: lesion.py --folds), each with the
class probabilities and the shift flag of the classifier that never saw its hospital (`busi cv --split source`: the
only classifier predictions both kinds of row can share; at home this p(malignant | lesion) is pessimistic, and the
shift flag is taken as not raised, as it is for all but ~5% of a model's own hospitals' images by construction).

The fits, each `operating.fit_joint_rule` (90% of the cancers and at most 10% of the lesions called normal in every
group, then the most normal scans called normal and benign lesions benign, averaged over groups):
- hospital-out: on the new rows, per held-out hospital (the bundled fit of issue 35);
- home: on the home rows, per hospital;
- shift-guarded: on both kinds, per kind and hospital, where an image flagged unlike the training images counts as a
  lesion found, whatever its lesion score: 'normal' only for a scan with no lesion found that looks like the images
  the model trained on.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from busi.bundled import joined_oof  # noqa: E402
from busi.errors import BusiError  # noqa: E402
from busi.operating import FAMILIAR_ONLY, fit_joint_rule, guarded, lesion_rule_figures  # noqa: E402

CLASSES = ["benign", "malignant", "normal"]
NAMES = {"busi_dev": "BUSI", "busbra_dev": "BUS-BRA", "uclm_dev": "BUS-UCLM"}


def rows(classifier_runs: list[Path], lesion_run: Path, kind: str, score: str = "lesion_score") -> tuple:
    """(probabilities, lesion scores, labels, groups "KIND: source", shift flags) of every image the runs share; at
    home the flags are taken as not raised."""
    probs, scores, labels, sources, _, outside = joined_oof(classifier_runs, [lesion_run], CLASSES, score)
    return probs, scores, labels, [f"{kind}: {s}" for s in sources], outside if kind == "new" else torch.zeros_like(outside)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classifier-cv", type=Path, action="append", required=True)
    ap.add_argument("--new", type=Path, required=True, help="benchmarks/lesion.py hospital-out run")
    ap.add_argument("--home", type=Path, required=True, help="benchmarks/lesion.py --folds run")
    ap.add_argument("--score", default="lesion_score", help="the lesion_oof.csv column taken as the lesion score "
                    "(lesion_score: the outline's peak; lesion.py also records score_area, score_mean, score_top2)")
    ap.add_argument("--md", type=Path)
    args = ap.parse_args()
    parts = [rows(args.classifier_cv, args.new, "new", args.score), rows(args.classifier_cv, args.home, "home", args.score)]
    p, raw, y = (torch.cat([part[k] for part in parts]) for k in (0, 1, 2))
    groups = parts[0][3] + parts[1][3]
    guarded_scores = guarded(raw, torch.cat([parts[0][4], parts[1][4]]), {FAMILIAR_ONLY: True})
    new = torch.tensor([g.startswith("new") for g in groups])
    fits = {"hospital-out": (raw, new), "home": (raw, ~new), "shift-guarded": (guarded_scores, torch.ones_like(new))}
    lines = ["| fit | lesion threshold | p(malignant \\| lesion) threshold | "
             + " | ".join(f"{NAMES.get(g.split(': ')[1])} ({g.split(':')[0]})" for g in sorted(set(groups))) + " |",
             "|---|---|---|" + "---|" * len(set(groups))]
    for name, (scores, fit_on) in fits.items():
        idx = torch.nonzero(fit_on).flatten()
        try:
            rule = fit_joint_rule(p[idx], scores[idx], y[idx], CLASSES, 0.9, 0.1, where=name,
                                  groups=[groups[i] for i in idx.tolist()])
        except BusiError as e:
            lines.append(f"| {name} | {e} |")
            continue
        figures = lesion_rule_figures(p, scores, y, CLASSES, rule, groups)
        cells = []
        for g in sorted(figures):
            f = figures[g]["lesion_first"]
            pct = lambda v: "–" if v is None else f"{v:.0%}"  # noqa: E731
            cells.append(f"{pct(f['sensitivity'])} / {pct(f['specificity'])} / {pct(f['normal_recall'])} / "
                         f"{pct(f['lesions_called_normal'])}")
        lines.append(f"| {name} | {rule['lesion_threshold']:.3f} | {rule['threshold']:.3f} | " + " | ".join(cells) + " |")
    from sklearn.metrics import roc_auc_score
    normal = CLASSES.index("normal")
    separation = []
    for g in sorted(set(groups)):
        idx = [i for i, h in enumerate(groups) if h == g]
        truth = (y[idx] != normal).numpy()
        if 0 < truth.sum() < len(idx):
            separation.append(f"{NAMES.get(g.split(': ')[1])} ({g.split(':')[0]}) {roc_auc_score(truth, raw[idx].numpy()):.3f}")
    table = "\n".join(lines + ["", "Cells: sensitivity / specificity / normal scans called normal / lesions called "
                                   "normal.", "", f"Normal vs lesion AUROC of {args.score}: " + ", ".join(separation)])
    print(table)
    if args.md:
        args.md.write_text(table + "\n")


if __name__ == "__main__":
    main()
