"""Rebuild the bundled model (busi/assets/): train configs/recommended.yaml on BUSI, store it in fp16, write its card.

    python scripts/bundle_model.py --data Dataset_BUSI_with_GT            # trains (about 20-30 min on a 2-core CPU)
    python scripts/bundle_model.py --data ../shared/data/busi_dev --from-run runs/recommended   # a finished run

The card (busi/assets/MODEL_CARD.md, card.json) records the command, commit, date and machine, the
cross-validated figures of the recipe (--cv, a `busi cv` folder) and, with --external, a `busi evaluate`
metrics.json on another hospital's images.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from busi import bundled  # noqa: E402


def _ci(v) -> str:
    return f"{v['estimate']:.3f} (95% CI {v['ci_low']:.3f}–{v['ci_high']:.3f})"


def card(data: dict, cv_dir: Path | None, external: Path | None) -> str:
    r = data["recipe"]
    op = data["operating_point"] or {}
    lines = [
        "# Model card: busi's bundled breast-ultrasound classifier", "",
        "**Research tool, not a medical device. It does not diagnose; do not use it to make clinical decisions.**", "",
        "## What it is",
        f"- {data['model']} (timm `tf_efficientnet_lite0`), fine-tuned from ImageNet weights, classes "
        f"{', '.join(data['classes'])}; input {data['image_size']}×{data['image_size']} RGB.",
        f"- Recipe: `configs/recommended.yaml` — {r['epochs']} epochs, AdamW lr {r['lr']}, weight decay {r['weight_decay']}, "
        f"cosine schedule, label smoothing {r['label_smoothing']}, flip / rotation / zoom / brightness / contrast / "
        f"autocontrast augmentation, mirror test-time augmentation"
        + (f"; every image first through busi.preprocess: {', '.join(r['preprocess'])} (applied by predict, evaluate "
           "and serve too)." if r.get("preprocess") else "."),
        (f"- Confidence: temperature {data['temperature']:.3f}, fitted on the 10% of the training images kept aside."
         if data["temperature"] != 1.0 else "- Confidence: the network's own softmax probabilities (no temperature: "
         "fitted on so few images it made the recipe's cross-validated calibration worse)."),
        (f"- Decision rule: 'malignant' whenever p(malignant) ≥ {op['threshold']:.3f} (set for "
         f"{op['target_recall']:.0%} malignant recall on {op['fitted_on']} validation images; it found "
         f"{op['recall_where_fitted']:.0%} there), else the most probable other class. `busi predict --json` gives "
         "the probabilities and the argmax answer too." if op else "- Decision rule: argmax."),
        f"- Stored as {data['stored_as']} ({data['size_bytes'] / 1e6:.1f} MB; fp16 is used only when it moves no "
        f"probability of the example images by more than 1e-3): at most {data['max_probability_change']:.1e} here.", "",
        "## Data",
        "Trained on `busi_dev`: 624 of the 780 images of BUSI (W. Al-Dhabyani, M. Gomaa, H. Khaled, A. Fahmy, "
        "\"Dataset of breast ultrasound images\", Data in Brief 28 (2020) 104863; Baheya Hospital, Cairo, 2018, "
        "one scanner family; released for research use), minus the 19 images of 8 label-conflict groups. The other "
        "156 BUSI images were kept back by the team for an independent check.", "",
        "## How well it does"]
    if cv_dir and (cv_dir / "cv_metrics.json").is_file():
        s = next(iter(json.loads((cv_dir / "cv_metrics.json").read_text()).values()))
        m = s["metrics"]
        lines += [f"Grouped {s['folds']}-fold cross-validation of the same recipe on busi_dev (near-duplicates never "
                  f"split; `busi cv --config configs/recommended.yaml --data ../shared/data/busi_dev --folds 3`): "
                  f"accuracy {_ci(m['accuracy'])}, macro-F1 {_ci(m['macro_f1'])}, macro-AUROC {_ci(m['auroc'])}, "
                  f"malignant recall {_ci(m['recall_malignant'])}. Each fold's model trained on two thirds of the data, "
                  "this one on all of it."]
        op_cv = s.get("operating_point")
        if op_cv and "accuracy" in op_cv:
            mal = op_cv["per_class"]["malignant"]
            lines += ["", f"At the operating point, out of fold: malignant recall {mal['recall']:.3f}, precision "
                          f"{mal['precision']:.3f}, accuracy {op_cv['accuracy']:.3f}."]
    if external and external.is_file():
        e = json.loads(external.read_text())["malignant_vs_benign"]
        lines += ["", f"**At another hospital** (BUS-BRA, Brazil, four other scanners, images cropped to the scan, no "
                      f"calipers; {e['n']} images): malignant-vs-benign AUROC {_ci(e['auroc'])}, sensitivity "
                      f"{_ci(e['sensitivity_argmax'])} and specificity {_ci(e['specificity_argmax'])} at argmax "
                      f"({e['ci_method']}). Expect it to do worse on your scanners than on BUSI."]
    lines += ["", "## Intended use and limits",
              "- For research and teaching: trying the tool, comparing methods, a starting point to fine-tune on your own "
              "data (`busi train --data YOUR_DATA`). Not for screening or diagnosis.",
              "- BUSI images carry burned-in calipers and text on many lesion images; a model can learn them as a "
              "shortcut. Images from other scanners, of other populations, or without such marks may be scored worse.",
              "- Three classes only (normal, benign, malignant); anything else (other organs, Doppler, elastography) "
              "still gets one of the three answers.", "",
              "## Provenance",
              f"- Built by `{data['command']}` at commit {data['commit']} on {data['bundled_at'][:10]}; trained in "
              f"{data['trained_with']['precision']} with channels-last {data['trained_with']['channels_last']} "
              f"({data['train_seconds']:.0f} s of training), bundled on {data['machine']}.",
              "- What it says about `examples/` (images it trained on, so no test of it):", ""]
    lines += [f"  - `{x['image']}`: {x['predicted']} (" + ", ".join(f"{c} {p:.2f}" for c, p in x["probabilities"].items()) + ")"
              for x in data["examples"]]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="BUSI in the Kaggle layout (Dataset_BUSI_with_GT)")
    parser.add_argument("--from-run", type=Path, help="a finished `busi train --config configs/recommended.yaml` run")
    parser.add_argument("--cv", type=Path, default=ROOT / "benchmarks" / "results" / "recommended")
    parser.add_argument("--external", type=Path, help="metrics.json of `busi evaluate` of this model on another hospital")
    args = parser.parse_args()
    recipe = ROOT / "configs" / "recommended.yaml"
    run = args.from_run
    command = f"python scripts/bundle_model.py --data {args.data}"
    if run is None:
        run = ROOT / "runs" / f"bundle-{datetime.now():%Y-%m-%dT%H%M%S}"
        subprocess.run([sys.executable, "-m", "busi.cli", "train", "--config", str(recipe), "--data", args.data,
                        "--out", str(run)], check=True)
    else:
        command += f" --from-run {run}  (run made by: busi train --config configs/recommended.yaml --data {args.data})"
    data = bundled.bundle(run, recipe, ROOT / "examples", command)
    if args.cv and (args.cv / "cv_metrics.json").is_file():  # one line for the web page's model card
        s = next(iter(json.loads((args.cv / "cv_metrics.json").read_text()).values()))
        data["cross_validation"] = f"grouped {s['folds']}-fold CV of the recipe: accuracy {_ci(s['metrics']['accuracy'])}"
        bundled.CARD_DATA.write_text(json.dumps(data, indent=2) + "\n")
    bundled.CARD.write_text(card(data, args.cv, args.external))
    print(f"wrote {bundled.MODEL} ({data['size_bytes'] / 1e6:.1f} MB), {bundled.CARD_DATA.name} and {bundled.CARD.name}")


if __name__ == "__main__":
    main()
