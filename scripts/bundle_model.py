"""Rebuild the bundled model (busi/assets/): train configs/recommended.yaml on every source we may ship, write its card.

    D="--data ../shared/data/busi_dev --data ../shared/data/busbra_dev --data ../shared/data/uclm_dev"
    M="--meta ../shared/data/busbra_dev/bus_data.csv --meta ../shared/data/uclm_dev/meta.csv"
    python scripts/bundle_model.py $D $M --hospital-cv benchmarks/results/hospitals3-recommended     # the classifier
    python scripts/bundle_model.py $D $M --hospital-cv benchmarks/results/hospitals3-recommended \
        --lesion-cv benchmarks/results/lesion3-hospitals                  # its segmenter beside it, and the rule
    (add --from-run RUN to bundle a finished `busi train` run of the same recipe and data instead of training)

--hospital-cv: `busi cv --split source` runs of the recipe (each source held out in turn): the card leads with their
figures, what to expect at a hospital the model never saw, and the stored threshold is fitted on their out-of-fold
predictions (hundreds of malignant images, each scored by a model that never saw its hospital: a threshold set for
hospitals the model never saw, not on the run's few validation images). --within-cv: a `busi cv` run of the recipe
on the same pooled sources: the figures at home, and what the stored threshold does there.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys

import yaml
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from busi import bundled  # noqa: E402
from busi.errors import BusiError  # noqa: E402
from busi.meta import source_meta  # noqa: E402

CITATIONS = {  # what the card repeats of each source we may ship (../shared/data/*/README.md, LICENSE.txt)
    "busi_dev": ("BUSI: W. Al-Dhabyani, M. Gomaa, H. Khaled, A. Fahmy, \"Dataset of breast ultrasound images\", Data in "
                 "Brief 28 (2020) 104863. Baheya Hospital, Cairo, 2018; released for research use.", "BUSI"),
    "busbra_dev": ("BUS-BRA: W. Gómez-Flores, M. J. Gregorio-Calas, W. C. de Albuquerque Pereira, \"BUS-BRA: A Breast "
                   "Ultrasound Dataset for Assessing Computer-aided Diagnosis Systems\", Medical Physics 51(4):3110–3123, "
                   "2024. National Institute of Cancer, Rio de Janeiro; free use and redistribution with its copyright "
                   "notice kept (busi/assets/LICENSE-BUS-BRA.txt), citation required.", "BUS-BRA"),
    "uclm_dev": ("BUS-UCLM: N. Vallez et al., \"BUS-UCLM: Breast ultrasound lesion segmentation dataset\", Scientific "
                 "Data 12, 242 (2025). A hospital in Spain, Siemens ACUSON S2000, 2022–2023; CC BY-NC 4.0 "
                 "(non-commercial use, with attribution): a model trained on it is for non-commercial use too.",
                 "BUS-UCLM"),
}
# the scanner of a source whose meta CSV names none (the card's per-scanner counts): from its README
SCANNERS = {"uclm_dev": "Siemens ACUSON S2000"}
SOURCE_NOTES = {"busi_dev": "BUSI images carry calipers and text.", "busbra_dev": "BUS-BRA's are cropped to the scan.",
                "uclm_dev": "BUS-UCLM's are Siemens scans, some with Doppler colour or caliper marks."}


def _ci(v) -> str:
    if not v:
        return "–"
    if v.get("ci_low") is None:
        return f"{v['estimate']:.3f}"
    return f"{v['estimate']:.3f} (95% CI {v['ci_low']:.3f}–{v['ci_high']:.3f})"


def _pct(v) -> str:
    return "–" if v is None else f"{v:.0%}"


def _specificity(op: dict | None) -> float | None:
    """Share of benign images not called malignant, from a confusion matrix (rows: benign, malignant, normal)."""
    if not op:
        return None
    benign = op["confusion_matrix"][0]
    return 1 - benign[1] / sum(benign) if sum(benign) else None


def hospital_out(runs: list[Path]) -> dict:
    """Per held-out source, from each run's cv_metrics.json: the figures of models that never saw that hospital."""
    out = {}
    for run in runs:
        s = next(iter(json.loads((run / "cv_metrics.json").read_text()).values()))
        for source, m in s["per_source"].items():
            entry = out.setdefault(source, [])
            mvb = m.get("malignant_vs_benign") or {}
            adapted = (m.get("adapted") or {}).get("malignant_vs_benign") or {}
            entry.append({"run": run.name, "n": m["n"], "auroc": mvb.get("auroc"), "ci_method": mvb.get("ci_method"),
                          "untrained": m.get("untrained_classes", []), "accuracy": m["accuracy"],
                          "normal_recall": (m["per_class"].get("normal") or {}).get("recall"),
                          "malignant_recall_at_fold_threshold": ((m.get("operating_point") or {}).get("per_class") or {})
                          .get("malignant", {}).get("recall"),
                          "specificity_at_fold_threshold": _specificity(m.get("operating_point")),
                          "adapted_auroc": adapted.get("auroc"),
                          "shift_flagged": (m.get("shift") or {}).get("share")})
    return out


def within(run: Path | None) -> dict | None:
    if not run:
        return None
    s = next(iter(json.loads((run / "cv_metrics.json").read_text()).values()))
    return {"run": run.name, "folds": s["folds"], "metrics": s["metrics"], "ci_method": s["ci_method"],
            "per_source": {k: {"n": v["n"], "accuracy": v["accuracy"], "macro_f1": v["macro_f1"],
                               "auroc": (v.get("malignant_vs_benign") or {}).get("auroc"),
                               "malignant_recall": (v["per_class"].get("malignant") or {}).get("recall"),
                               "shift_flagged": (v.get("shift") or {}).get("share")}
                           for k, v in (s.get("per_source") or {}).items()},
            "shift_flagged": (s.get("shift") or {}).get("share")}


def lesion_rule_lines(op: dict, name: dict) -> list[str]:
    """The lesion-first rule in plain words, with what it did at each hospital no model of it had seen."""
    def pct(v):
        return _pct(v)
    per = []
    for source, f in (op.get("per_source") or {}).items():
        mine, alone = f["lesion_first"], f["classifier_alone"]
        normals = (f", normal scans called normal {pct(mine['normal_recall'])} (classifier alone "
                   f"{pct(alone['normal_recall'])}) and malignant {pct(mine['normal_called_malignant'])} (classifier "
                   f"alone {pct(alone['normal_called_malignant'])}), lesions called normal "
                   f"{pct(mine['lesions_called_normal'])}, "
                   f"3-class accuracy {mine['accuracy']:.3f} (classifier alone {alone['accuracy']:.3f})"
                   if mine.get("normal_recall") is not None else f", lesions called normal {pct(mine['lesions_called_normal'])}")
        per.append(f"{name.get(source, source)} held out ({f['images']} predictions): sensitivity "
                   f"{pct(mine['sensitivity'])}, specificity {pct(mine['specificity'])}{normals}; the classifier alone "
                   f"at its own hospital-out threshold ({alone['threshold']:.3f}): sensitivity "
                   f"{pct(alone['sensitivity'])}, specificity {pct(alone['specificity'])}")
    seg = []
    for run, sources in (op.get("segmentation_hospital_out") or {}).items():
        for source, v in sources.items():
            sep = (f"; normal vs lesion AUROC {v['normal_vs_lesion_auroc']:.3f}" if "normal_vs_lesion_auroc" in v else "")
            seg.append(f"{name.get(source, source)} held out: Dice {v['dice_mean']:.3f} (median {v['dice_median']:.3f}) "
                       f"over {v['lesion_images']} lesion images{sep} ({run})")
    familiar = op.get("normal_only_if_familiar")
    how = (f"the lesion threshold set to find {op['lesion_recall']:.0%} of the lesions, then the malignant one for "
           f"{op['target_recall']:.0%} of the cancers through both steps" if "lesion_recall" in op else
           "both thresholds fitted together: at least "
           f"{op['target_recall']:.0%} of the cancers at every "
           + ("hospital, both where the model trained and where it never did" if familiar else "held-out hospital")
           + " (a cancer with no lesion found counts "
           f"as missed), at most {op.get('max_lesions_called_normal', 0.1):.0%} of the lesions called normal, then as "
           "many normal scans called normal and benign lesions benign as that allows")

    def label(group: str) -> str:  # "home: busi_dev" -> "BUSI (home)"
        kind, _, source = group.rpartition(": ")
        return f"{name.get(source, source)} ({kind})" if kind else name.get(group, group)
    trade = op.get("tradeoff") or []
    tradeoff = ([f"The trade-off, per {'hospital, at home and as a new hospital' if familiar else 'held-out hospital'} "
                 "(the same joint fit for each malignant recall asked for; "
                 "sensitivity / specificity / normal scans called normal):", "",
                 "| malignant recall asked | " + " | ".join(label(g) for g in trade[0]["per_group"]) + " |",
                 "|---|" + "---|" * len(trade[0]["per_group"])]
                + [f"| {t['target_recall']:.0%} | " + " | ".join(
                    f"{_pct(v['sensitivity'])} / {_pct(v['specificity'])} / {_pct(v['normal_recall'])}"
                    for v in t["per_group"].values()) + " |" for t in trade] + [""]) if trade else []
    return ["**The stored decision rule** (lesion-first): 'normal' when the model finds no lesion (its lesion score "
            f"below {op['lesion_threshold']:.3f})"
            + (" and the scan looks like the images it trained on (a scan the shift check flags is judged as a "
               "lesion: at a hospital the model never saw, its segmenter misses lesions more often than it finds "
               "normal tissue)" if familiar else "") + "; otherwise 'malignant' when p(malignant) / (p(malignant) + "
            f"p(benign)) is at least {op['threshold']:.3f}, else 'benign' ({how}). A scan with no lesion found is "
            "never called malignant, however high its p(malignant), and a scan called benign or malignant always "
            f"shows the lesion it was judged on. Fitted on {op['fitted_on']} {op['fitted_where']}: "
            f"{op['fitted_on_lesions']} lesions, {op['fitted_on_positives']} of them malignant"
            + (f", and {op['fitted_on_normals']} normal scans" if op.get("fitted_on_normals") else "") + ".", "",
            "What the rule did there, per held-out hospital: " + "; ".join(per) + ".", "", *tradeoff,
            *([f"At home ({'segmenters' if familiar else 'segmenters and classifiers'} cross-validated within the "
               f"pooled sources, normal scans in training: {', '.join(op['at_home']['runs'])}), the same rule: "
               + "; ".join(
                   f"{name.get(k, k)}: sensitivity {pct(v['lesion_first']['sensitivity'])}, specificity "
                   f"{pct(v['lesion_first']['specificity'])}"
                   + (f", normal scans called normal {pct(v['lesion_first']['normal_recall'])} and malignant "
                      f"{pct(v['lesion_first']['normal_called_malignant'])}, 3-class accuracy "
                      f"{v['lesion_first']['accuracy']:.3f}" if v['lesion_first'].get('normal_recall') is not None
                      else "")
                   + f", lesions called normal {pct(v['lesion_first']['lesions_called_normal'])}"
                   for k, v in op["at_home"].items() if k not in ("runs", "segmentation")) + "; the outline's Dice "
               + "; ".join(f"{name.get(k, k)} {v['dice_mean']:.3f}" + (f", normal vs lesion AUROC "
                                                                        f"{v['normal_vs_lesion_auroc']:.3f}"
                                                                        if "normal_vs_lesion_auroc" in v else "")
                           for per in op["at_home"]["segmentation"].values() for k, v in per.items())
               + (". The classifier's probabilities there are its hospital-out ones (pessimistic at home); the shift "
                  "flag is taken as not raised (it is for about 5% of a model's own hospitals' images)." if familiar
                  else ". The lesion threshold is set for hospitals the segmenter never saw, where it finds fewer "
                  "lesions: at home it leaves most normal scans outlined, and those are judged as lesions."), ""]
              if op.get("at_home") else []),
            "**The lesion outline** (a U-Net segmenter beside the classifier, trained on every image's lesion mask; a "
            "normal scan's is empty), measured the same way, each hospital outlined by a segmenter that never saw it: "
            + "; ".join(seg) + ". `busi predict` gives each image's outline (box, polygon, width, depth, "
            "depth-to-width), `busi evaluate` its Dice against your masks.", "",
            "At your hospital: `busi evaluate --data YOUR_LABELLED_FOLDER` first (it says when your images lie "
            "outside what the model trained on); then `busi calibrate --data YOUR_LABELLED_FOLDER --malignant-recall "
            "0.9` re-fits both thresholds together the same way on your images (the lesion threshold only where 10 "
            "normal scans or more are there) and says the recall it can promise, cross-fitted over your patients.", ""]


def card(data: dict) -> str:
    r, op = data["recipe"], data["operating_point"] or {}
    name = {k: v[1] for k, v in CITATIONS.items()}
    lines = ["# Model card: busi's bundled breast-ultrasound classifier", "",
             "**Research tool, not a medical device. It does not diagnose; do not use it to make clinical decisions.**", ""]
    ho = data.get("hospital_out") or {}
    if ho:
        lines += ["## What to expect at a hospital it never saw",
                  "Hospital-out cross-validation of the same recipe (`busi cv --split source`): each source held out "
                  "in turn, tested by a model trained on the others, which never saw it. This model trains on all of "
                  "them, so at another hospital expect figures of this kind, not the home figures below:", ""]
        for source, runs in ho.items():
            first = dict(runs[0])
            for key in ("shift_flagged", "adapted_auroc"):  # older runs lack some figures: the first run that has them
                first[key] = next((x[key] for x in runs if x.get(key) is not None), None)
            others = ", ".join(f"{x['auroc']['estimate']:.3f}" for x in runs[1:])
            seeds = f" (another training seed: {others})" if others else ""
            three = ("" if first["untrained"] or first["normal_recall"] is None else
                     f"; 3-class accuracy {first['accuracy']:.3f}, normal recall {first['normal_recall']:.3f}")
            adapted = f"; after `busi adapt` {first['adapted_auroc']['estimate']:.3f}" if first.get("adapted_auroc") else ""
            lines.append(f"- **{name.get(source, source)} held out** ({first['n']} images): malignant-vs-benign AUROC "
                         f"{_ci(first['auroc'])}{seeds}{adapted}; at the threshold the fold model set on its own "
                         f"validation images: sensitivity {_pct(first['malignant_recall_at_fold_threshold'])}, "
                         f"specificity {_pct(first['specificity_at_fold_threshold'])}{three}; "
                         f"{_pct(first['shift_flagged'])} of its images flagged as unlike the training images.")
        lines.append("")
    if op.get("rule") == "lesion-first":
        lines += lesion_rule_lines(op, name)
    elif op:
        def where(block):
            return "; ".join(f"{name.get(k, k)}: sensitivity {v['recall']:.0%}, specificity {_pct(v.get('specificity'))}"
                             + (f", normal scans called malignant {v['normal_called_malignant']:.0%}"
                                if "normal_called_malignant" in v else "")
                             for k, v in (block or {}).items() if k != "runs")
        after = data.get("operating_point_after_adapt") or {}
        lines += [f"**The stored decision rule**: 'malignant' whenever p(malignant) ≥ {op['threshold']:.3f}, else the most "
                  f"probable other class. It was set for {op['target_recall']:.0%} malignant recall on the "
                  f"{op['fitted_on']} {op.get('fitted_where', 'validation images')}, {op['fitted_on_positives']} of them "
                  f"malignant — a threshold set for hospitals a model never saw, where probabilities of malignancy run "
                  f"lower. There, per held-out hospital: {where(op.get('per_source'))}."
                  + (f" The sensitivity it can promise at a new hospital like these: {op['expected_recall']:.3f} (95% "
                     f"interval {op['recall_ci'][0]:.3f}–{op['recall_ci'][1]:.3f}; {op['ci_method']})."
                     if op.get("recall_ci") else "")
                  + (f" At home (the within-source cross-validation's predictions at the same threshold): "
                     f"{where(op.get('at_home'))} — it is set for sensitivity first, and calls many benign lesions, "
                     "and normal scans, malignant." if op.get("at_home") else "")
                  + (f" After `busi adapt` the model switches to the threshold fitted the same way on adapted "
                     f"predictions, {after['threshold']:.3f} ({where(after.get('per_source'))})." if after else ""), "",
                  "At your hospital: `busi evaluate --data YOUR_LABELLED_FOLDER` first (it says when your images lie "
                  "outside what the model trained on); re-set the threshold on your own labelled images with "
                  "`busi calibrate --data YOUR_LABELLED_FOLDER --malignant-recall 0.9` (it needs 10 malignant images "
                  "or more, and says what recall it can promise), or adapt the model: `busi adapt` (no labels) or "
                  "`busi finetune` (labelled images; README, \"At your hospital\").", ""]
    w = data.get("within_source")
    if w:
        m = w["metrics"]
        lines += ["## At home: cross-validated on the sources it trained on",
                  f"Grouped {w['folds']}-fold cross-validation of the recipe on the pooled sources (patients and "
                  f"near-duplicates never split): accuracy {_ci(m['accuracy'])}, macro-F1 {_ci(m['macro_f1'])}, "
                  f"macro-AUROC {_ci(m['auroc'])}, malignant recall {_ci(m['recall_malignant'])} (argmax; "
                  f"{w['ci_method']})."]
        for source, v in w["per_source"].items():
            lines.append(f"- {name.get(source, source)} ({v['n']} images): accuracy {v['accuracy']:.3f}, macro-F1 "
                         f"{v['macro_f1']:.3f}, malignant-vs-benign AUROC {_ci(v['auroc'])}, malignant recall "
                         f"{v['malignant_recall']:.3f}; {_pct(v.get('shift_flagged'))} flagged as unlike the fold "
                         "model's training images (no folder warning below three times the 5% rate).")
        lines.append("")
    steps = r.get("preprocess") or []
    lines += ["## What it is",
              f"- {data['model']}" + (" (timm `tf_efficientnet_lite0`)" if data["model"] == "efficientnet-lite0" else "")
              + ", fine-tuned from ImageNet weights, classes "
              f"{', '.join(data['classes'])}; input {data['image_size']}×{data['image_size']} RGB.",
              *([f"- Lesion segmenter beside it (`configs/lesion.yaml`): EfficientNet-Lite0 encoder from ImageNet "
                 f"weights and a U-Net decoder (segmentation-models-pytorch) at {r['lesion_size']}×{r['lesion_size']} "
                 f"px, {r['epochs']} epochs of binary cross-entropy + Dice on every training image's lesion mask (a "
                 "normal scan's is empty), with the augmentation below, trained beside the classifier, which is kept "
                 "as it was (its recipe: `configs/recommended.yaml`, 30 epochs, on the same sources)."]
                if r.get("lesion_size") else []),
              f"- {'Classifier recipe' if r.get('lesion_size') else 'Recipe'}: `configs/recommended.yaml` — "
              f"{30 if r.get('lesion_size') else r['epochs']} epochs, AdamW lr {r['lr']}, weight decay "
              f"{r['weight_decay']}, cosine schedule, label smoothing {r['label_smoothing']}, flip / rotation / zoom / "
              "brightness / contrast / autocontrast augmentation"
              + (f", lesion windows (p {r['lesion_windows']}: views clear of the lesion taught as normal)"
                 if r.get("lesion_windows") else "") + ", mirror test-time augmentation"
              + (f"; every image first through busi.preprocess: {', '.join(steps)} (predict, evaluate and serve "
                 "apply it too)." if steps else "."),
              ("- Confidence: the network's own softmax probabilities (no temperature)." if data["temperature"] == 1.0
               else f"- Confidence: temperature {data['temperature']:.3f}."),
              (f"- Shift warning: it carries a summary of its {data['shift']['n_reference']} training images in its own "
               f"feature space; an image farther from them than {data['shift']['quantile']:.0%} of "
               f"{data['shift']['n_heldout']} held-out images of its sources is flagged, and a folder where too many "
               "are (evaluate, predict, serve)." if data.get("shift") else "- No shift summary."),
              f"- It carries fingerprints of its {data['fingerprints']} training images, so `busi evaluate` finds copies "
              "of them in your test folder on any machine.",
              f"- Stored as {data['stored_as']} ({data['size_bytes'] / 1e6:.1f} MB): "
              + ("float16 moved no probability (or lesion score) of the example images by more than "
                 f"{data['max_probability_change']:.1e}." if data["stored_as"] == "float16" else
                 "float16 would have moved a probability of the example images by more than 0.001"
                 + (f"; the segmenter's float16 tensors move no probability and no lesion score of them by more "
                    f"than {data['max_lesion_score_change']:.1e}." if "segmenter" in data["stored_as"] else ".")), "",
              "## Data"]
    summary = data.get("data") or {}
    for source, s in (summary.get("sources") or {}).items():
        classes = ", ".join(f"{c} {n}" for c, n in sorted(s["classes"].items()))
        scanners = ("; scanners: " + ", ".join(f"{k} {n}" for k, n in sorted(s["scanners"].items(), key=lambda kv: -kv[1]))
                    if s.get("scanners") else "")
        cite = CITATIONS.get(source, (source, source))[0]
        lines.append(f"- `{source}`: {s['images']} images ({classes}){scanners}. {cite}")
    if summary:
        lines += [f"- Left out: {summary['left_out_label_conflicts']} images of BUSI's label-conflict groups (one scan "
                  "filed under two classes); about 10% of the images (grouped by patient) were kept aside to set the "
                  "shift threshold. The rest of each dataset, and one more hospital, are kept back by the team for "
                  "checks nobody tunes to.", ""]
    lines += ["## Intended use and limits",
              "- For research and teaching: trying the tool, comparing methods, a starting point to adapt to your own "
              "data. Not for screening or diagnosis.",
              f"- {len(summary.get('sources') or {}) or 'Several'} hospitals: "
              + "; ".join(name.get(k, k) for k in (summary.get("sources") or {}))
              + ". " + " ".join(SOURCE_NOTES[k] for k in (summary.get("sources") or {}) if k in SOURCE_NOTES)
              + " Other scanners, settings and populations may be scored worse — the hospital-out figures above are "
              "the honest guide, and the shift warning says when your images differ.",
              "- Normal scans come from " + (" and ".join(name.get(k, k) for k, v in (summary.get("sources") or {}).items()
                                                         if v["classes"].get("normal")) or "BUSI") + " only.",
              *(["- Trained on BUS-UCLM (CC BY-NC 4.0): this model is for non-commercial use."]
                if "uclm_dev" in (summary.get("sources") or {}) else []),
              "- Three classes only (normal, benign, malignant); anything else (other organs, Doppler, elastography) "
              "still gets one of the three answers.", "",
              "## Provenance",
              f"- Built by `{data['command']}` at commit {data['commit']} on {data['bundled_at'][:10]}; trained in "
              f"{data['trained_with']['precision']} with channels-last {data['trained_with']['channels_last']} "
              f"({data['train_seconds'] / 60:.0f} min of training), bundled on {data['machine']}.",
              "- What it says about `examples/` (BUSI images it trained on, so no test of it):", ""]
    lines += [f"  - `{x['image']}`: {x['predicted']} (" + ", ".join(f"{c} {p:.2f}" for c, p in x["probabilities"].items())
              + ")" for x in data["examples"]]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", required=True, help="a source folder (repeat): BUSI, BUS-BRA")
    parser.add_argument("--meta", action="append", default=[], help="meta CSV (e.g. BUS-BRA's bus_data.csv)")
    parser.add_argument("--patient-column", default="Case,Patient", help="each CSV's patient column (alternatives: "
                        "BUS-BRA's Case, BUS-UCLM's Patient)")
    parser.add_argument("--group-column", default="Device")
    parser.add_argument("--from-run", type=Path, help="a finished `busi train --config configs/recommended.yaml` run")
    parser.add_argument("--hospital-cv", type=Path, action="append", default=[],
                        help="a `busi cv --split source` run of the recipe (repeat for other seeds)")
    parser.add_argument("--within-cv", type=Path, help="a `busi cv` run of the recipe on the pooled sources: the home "
                        "figures, and what the stored threshold does there")
    parser.add_argument("--adapted-threshold", action="store_true", help="also store the threshold `busi adapt` switches "
                        "to, fitted on the --hospital-cv runs' predictions after adaptation")
    parser.add_argument("--lesion-cv", type=Path, action="append", default=[],
                        help="a benchmarks/lesion.py run (hospital-out segmenters): bundle configs/lesion.yaml, a lesion "
                        "segmenter trained beside --classifier, with the lesion-first rule fitted on these runs and the "
                        "--hospital-cv runs (the classifier's hospital-out predictions)")
    parser.add_argument("--lesion-home", type=Path, action="append", default=[],
                        help="a benchmarks/lesion.py --folds run (segmenters cross-validated at home): with --within-cv, "
                        "what the stored rule does at home")
    parser.add_argument("--classifier-run", type=Path, help="with --from-run and --lesion-cv: the `busi train --config "
                        "configs/recommended.yaml` run (same data) whose checkpoint is RUN/classifier.pth: the card "
                        "says so, and counts its training time")
    parser.add_argument("--normal-only-if-familiar", action="store_true",
                        help="with --lesion-cv and --lesion-home: 'normal' only for a scan with no lesion found that the "
                        "shift check does not flag, the rule fitted on the hospital-out and the home predictions "
                        "together, each bound held at every hospital in both (busi.operating.FAMILIAR_ONLY)")
    parser.add_argument("--classifier", type=Path, default=bundled.MODEL,
                        help="with --lesion-cv: the trained classifier the segmenter joins (kept as it is; default: the "
                        "bundled model, copied into the run folder first)")
    args = parser.parse_args()
    recipe = ROOT / "configs" / ("lesion.yaml" if args.lesion_cv else "recommended.yaml")
    data_flags = [x for d in args.data for x in ("--data", d)] + [x for m in args.meta for x in ("--meta", m)]
    # the group (scanner) column is read for the card only: not every source's CSV has one
    meta_flags = ["--patient-column", args.patient_column] if args.meta else []
    train = ["busi", "train", "--config", str(recipe.relative_to(ROOT)), *data_flags, *meta_flags]
    command = "python scripts/bundle_model.py " + " ".join(sys.argv[1:])
    run = args.from_run
    if run is None:
        run = ROOT / "runs" / f"bundle-{datetime.now():%Y-%m-%dT%H%M%S}"
        if args.lesion_cv:  # the segmenter trains beside the classifier, which stays as it is
            run.mkdir(parents=True)
            parent = run / "classifier.pth"
            shutil.copy(args.classifier, parent)
            config = yaml.safe_load(recipe.read_text())
            config.update({"init_checkpoint": str(parent), "freeze_classifier": True})
            (run / "recipe.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            train[3] = str(run / "recipe.yaml")
        subprocess.run([sys.executable, "-m", "busi.cli", *train[1:], "--out", str(run / "train")
                        if args.lesion_cv else str(run)], check=True)
    made_by = " ".join(train).replace(str(run), "RUN")
    classifier_seconds = 0.0
    if args.lesion_cv:
        parent = "the bundled classifier"
        if args.classifier_run:  # a classifier trained for this bundle: its command and its time
            from busi.checkpoint import read
            classifier_seconds = read(args.classifier_run / "efficientnet-lite0" / "checkpoint.pth")["config"].get(
                "train_seconds") or 0.0
            parent = (f"the classifier of `busi train --config configs/recommended.yaml {' '.join(data_flags)} "
                      f"{' '.join(meta_flags)} --out {args.classifier_run}` ({classifier_seconds / 60:.0f} min)")
        made_by = (f"{parent} copied to RUN/classifier.pth, {recipe.relative_to(ROOT)} with init_checkpoint "
                   f"RUN/classifier.pth and freeze_classifier: true as RUN/recipe.yaml, then {made_by} --out RUN/train")
        if (run / "train").is_dir():
            run = run / "train"
    command = command.replace(str(run), "RUN") + f"  (RUN made by: {made_by})"
    info = {}
    if args.meta:
        split = json.loads((run / "split.json").read_text())
        paths = split["train"] + split["val"]
        sources = [p.split("/", 1)[0] for p in paths]
        rows, _ = source_meta(paths, sources, args.meta, "ID", [args.patient_column])
        info = {p: {"patient": f"{p.split('/', 1)[0]}:{v[args.patient_column]}"} for p, v in rows.items()}
        for meta in args.meta:  # scanners where a CSV names them, else the source's own (SCANNERS)
            try:
                groups, _ = source_meta(paths, sources, [meta], "ID", [args.group_column])
            except BusiError:
                continue
            for p, v in groups.items():
                info.setdefault(p, {})["group"] = v[args.group_column]
        for p in paths:
            if p.split("/", 1)[0] in SCANNERS:
                info.setdefault(p, {}).setdefault("group", SCANNERS[p.split("/", 1)[0]])
    patients = {p: v["patient"] for p, v in info.items() if "patient" in v}
    data = bundled.bundle(run, recipe, ROOT / "examples", command, threshold_runs=args.hospital_cv, patients=patients,
                          home_runs=[args.within_cv] if args.within_cv else [],
                          adapted_threshold_runs=[r for r in args.hospital_cv if args.adapted_threshold and "adapted_p_"
                                                  in (r / "oof_predictions.csv").open().readline()],
                          lesion_runs=args.lesion_cv, lesion_home_runs=args.lesion_home,
                          familiar_only=args.normal_only_if_familiar)
    data["data"] = bundled.data_summary(run, info)
    data["train_seconds"] = (data.get("train_seconds") or 0.0) + classifier_seconds  # the classifier's, and the segmenter's
    data["hospital_out"] = hospital_out(args.hospital_cv)
    data["within_source"] = within(args.within_cv)
    if data["within_source"]:
        a = data["within_source"]["metrics"]["accuracy"]
        data["cross_validation"] = f"at home (grouped CV, every source): accuracy (most probable class) {_ci(a)}"
    elif (data.get("operating_point") or {}).get("at_home"):  # the stored rule at home (segmenters cross-validated)
        home = {k: v["lesion_first"] for k, v in data["operating_point"]["at_home"].items()
                if k not in ("runs", "segmentation")}
        named = {k: v[1] for k, v in CITATIONS.items()}
        data["cross_validation"] = "at home, the stored rule (segmenters cross-validated within the sources): " + "; ".join(
            f"{named.get(k, k)} sensitivity {_pct(v['sensitivity'])}, specificity {_pct(v['specificity'])}"
            + (f", normal scans called normal {_pct(v['normal_recall'])}" if v.get("normal_recall") is not None else "")
            for k, v in home.items())
    if data["hospital_out"]:  # the headline of `busi model` and the web page: the stored rule's figures first
        at_rule = (data.get("operating_point") or {}).get("per_source") or {}

        def headline(source, runs):
            rule = (at_rule.get(source) or {}).get("lesion_first")
            said = (f"sensitivity {_pct(rule['sensitivity'])}, specificity {_pct(rule['specificity'])}"
                    + (f", normal scans called normal {_pct(rule['normal_recall'])}, 3-class accuracy "
                       f"{rule['accuracy']:.2f}" if rule.get("normal_recall") is not None else "")
                    + " at the stored rule; " if rule else "")
            return (f"{CITATIONS.get(source, (source, source))[1]} held out: {said}malignant-vs-benign AUROC "
                    f"{runs[0]['auroc']['estimate']:.3f}")
        data["hospitals_never_seen"] = "; ".join(headline(s, v) for s, v in data["hospital_out"].items())
    bundled.CARD_DATA.write_text(json.dumps(data, indent=2) + "\n")
    bundled.CARD.write_text(card(data))
    for d in args.data:
        if (Path(d) / "LICENSE.txt").is_file() and Path(d).name == "busbra_dev":
            shutil.copy(Path(d) / "LICENSE.txt", bundled.ASSETS / "LICENSE-BUS-BRA.txt")
    print(f"wrote {bundled.MODEL} ({data['size_bytes'] / 1e6:.1f} MB), {bundled.CARD_DATA.name} and {bundled.CARD.name}")


if __name__ == "__main__":
    main()
