"""What re-setting the lesion-first rule on half of a new hospital's patients buys on the other half (`busi calibrate`).

    python benchmarks/lesion_calibrate.py --lesion-cv benchmarks/results/lesion-hospitals \
        --classifier-cv benchmarks/results/hospitals-recommended --meta ../shared/data/busbra_dev/bus_data.csv \
        --rule-from busi/assets/card.json --draws 20 --out benchmarks/results/lesion-calibrate

Reads hospital-out predictions only (no training): a `benchmarks/lesion.py` run's segmenter scores and a `busi cv
--split source` run's classifier probabilities, both for images of a hospital their models never saw. For each held-out
hospital and draw, its patients (joined with near-duplicates) are split in half, stratified by class: on one half
both thresholds are fitted as `busi calibrate` fits them (the lesion threshold finding 95% of its lesions, then the
malignant one making the whole rule find 90% of its cancers); both the re-set rule and the stored one are scored on
the other half. Written: lesion_calibrate.json (per hospital, each figure's mean and 2.5-97.5% range over draws).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from busi.errors import BusiError  # noqa: E402
from busi.operating import fit_lesion_rule, lesion_rule_figures  # noqa: E402
from lesion import clusters_of, read_csv  # noqa: E402

CLASSES = ["benign", "malignant", "normal"]
FIGURES = ("sensitivity", "specificity", "normal_recall", "lesions_called_normal", "accuracy")


def joined(lesion_cv: Path, classifier_cv: Path, meta: list[str]):
    rows = read_csv(lesion_cv / "lesion_oof.csv")
    probs = {r["path"]: r for r in read_csv(classifier_cv / "oof_predictions.csv")}
    rows = [r for r in rows if r["path"] in probs]
    clusters = np.asarray(clusters_of(rows, meta, "Case", [classifier_cv / "audit.json"]))
    p = torch.tensor([[float(probs[r["path"]][f"p_{c}"]) for c in CLASSES] for r in rows])
    y = torch.tensor([CLASSES.index(r["true"]) for r in rows])
    s = torch.tensor([float(r["lesion_score"]) for r in rows])
    return rows, p, y, s, clusters


def summary(values: list[float]) -> dict:
    return {"mean": round(float(np.mean(values)), 4),
            "range": [round(float(np.quantile(values, q)), 4) for q in (0.025, 0.975)]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lesion-cv", type=Path, required=True)
    ap.add_argument("--classifier-cv", type=Path, required=True)
    ap.add_argument("--meta", action="append", default=[])
    ap.add_argument("--rule-from", type=Path, required=True, help="the bundled model's card.json: the stored rule")
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    stored = json.loads(args.rule_from.read_text())["operating_point"]
    rows, p, y, s, clusters = joined(args.lesion_cv, args.classifier_cv, args.meta)
    held = np.asarray([r["held_out"] for r in rows])
    out = {"stored_rule": stored, "draws": args.draws, "per_held_out_source": {}}
    for name in sorted(set(held.tolist())):
        idx = np.flatnonzero(held == name)
        results: dict[str, dict[str, list[float]]] = {"re_set": {}, "stored": {}, "lesion_threshold": {}}
        for draw in range(args.draws):
            fit_half, test_half = next(StratifiedGroupKFold(2, shuffle=True, random_state=draw).split(
                idx, y[idx].numpy(), clusters[idx]))
            a, b = map(torch.from_numpy, (idx[fit_half], idx[test_half]))
            try:
                rule = fit_lesion_rule(p[a], s[a], y[a], CLASSES, malignant_recall=0.9, lesion_recall=0.95,
                                       where=f"half of {name}")
            except BusiError as e:
                print(f"{name} draw {draw}: {e}")
                continue
            results["lesion_threshold"].setdefault("value", []).append(rule["lesion_threshold"])
            for label, used in (("re_set", rule), ("stored", stored)):
                got = lesion_rule_figures(p[b], s[b], y[b], CLASSES, used)["all"]["lesion_first"]
                for k in FIGURES:
                    if got[k] is not None:
                        results[label].setdefault(k, []).append(got[k])
        out["per_held_out_source"][name] = {
            "images": int(len(idx)), "draws_used": len(results["lesion_threshold"].get("value", [])),
            **{label: {k: summary(v) for k, v in figures.items()} for label, figures in results.items()}}
        print(name, json.dumps(out["per_held_out_source"][name]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lesion_calibrate.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
