"""The `busi` command: parses arguments, calls the functions that do the work, prints results and one-line errors."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .errors import BusiError


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", action="append", help="dataset folder with one sub-folder per class (e.g. "
                   "Dataset_BUSI_with_GT); repeat to pool several sources (e.g. BUSI and your hospital's images)")
    p.add_argument("--config", help="YAML file of settings (flags given here override it)")
    p.add_argument("--meta", action="append", help="CSV with a row per image (e.g. BUS-BRA's bus_data.csv), matched by "
                   "file name; repeat for several sources (each CSV describes the source whose images it names)")
    p.add_argument("--id-column", help="the meta column holding each image's file name without extension (default: ID)")
    p.add_argument("--patient-column", help="meta column naming the patient (e.g. Case): a patient's images stay on "
                                            "one side of every split, and confidence intervals resample patients")
    p.add_argument("--group-column", help="meta column to break each source's figures down by (e.g. Device)")
    p.add_argument("--model", dest="models", action="append", help="custom-cnn, resnet18, resnet50, efficientnet-lite0 or efficientnet-lite2; repeat for several "
                        "(default: custom-cnn and resnet50, the seed experiment)")
    p.add_argument("--classes", nargs="+", help="class folder names, in label order (default: every sub-folder)")
    p.add_argument("--image-size", type=int, help="side of the square model input in pixels (default 224)")
    p.add_argument("--epochs", type=int, help="training epochs (default 25)")
    p.add_argument("--batch-size", type=int, help="images per step and per device (default 32)")
    p.add_argument("--lr", type=float, help="learning rate (default 0.001)")
    p.add_argument("--weight-decay", type=float, help="weight decay (default 0)")
    p.add_argument("--seed", type=int, help="seed of the split, the folds and training (default 0)")
    p.add_argument("--split", choices=["grouped", "random", "source"],
                   help="grouped (default) keeps near-duplicates together; random ignores them (leaky; for comparison "
                        "only); source (cv with several --data): each fold holds out one whole source, a hospital the "
                        "model never saw")
    p.add_argument("--weights", help="local ImageNet state dict for resnet models (offline machines)")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false", default=None,
                   help="start resnet models from random weights")
    p.add_argument("--accelerator", help="cpu, gpu, mps or auto (default auto; Lightning)")
    p.add_argument("--devices", help="how many devices per machine, or auto (default auto; Lightning)")
    p.add_argument("--precision", help="auto (default: bf16-mixed where the device computes bf16 natively, else 32-true), "
                                       "32-true, bf16-mixed, 16-mixed … (Lightning)")
    p.add_argument("--channels-last", action="store_true", default=None,
                   help="NHWC memory layout (default auto: on for CPU and CUDA)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="keep the NCHW layout")
    p.add_argument("--strategy", help="auto, ddp … (default auto; Lightning)")
    p.add_argument("--num-nodes", type=int, help="machines in a multi-node run (default 1; Lightning)")
    p.add_argument("--val-size", type=float,
                   help="share of the training part kept aside for the temperature and the malignant threshold "
                        "(default 0.1; 0: none)")
    p.add_argument("--fit-temperature", action=argparse.BooleanOptionalAction, default=None,
                   help="scale the probabilities by a temperature fitted on the validation part (default: on; "
                        "configs/recommended.yaml: off)")
    p.add_argument("--preprocess", nargs="+", metavar="STEP",
                   help="clean every image before training and prediction (kept in the checkpoint): crop (to the scan "
                        "region), overlays (paint out calipers and text), clahe (equalise grey levels), pad (to a "
                        "square with black, so resizing keeps proportions)")
    p.add_argument("--cine-frames", choices=["middle", "all"], help="what a DICOM cine loop trains with: its middle "
                   "frame (default) or every frame, each a sample (a loop's frames stay on one side of every split)")
    p.add_argument("--ultrasound-p", type=float, help="chance of each ultrasound-like augmentation (speckle, gain, blur, "
                                                      "depth attenuation) per image (default 0)")
    p.add_argument("--out", help="run folder (default: runs/<timestamp>-<name>)")
    p.add_argument("--overwrite", action="store_true", help="write into an --out folder that already holds a run")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


RUN_KEYS = ("data", "meta", "id_column", "patient_column", "group_column", "malignant_recall", "models", "preprocess", "cine_frames", "ultrasound_p", "classes", "image_size", "epochs", "batch_size", "lr", "weight_decay", "seed", "split",
            "weights", "pretrained", "accelerator", "devices", "precision", "channels_last", "strategy", "num_nodes", "test_size",
            "val_size", "fit_temperature", "folds", "repeats", "external", "external_meta", "external_id_column", "external_patient_column",
            "external_group_column")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="busi", description="Breast-ultrasound classifiers with honest, duplicate-aware evaluation.")
    root.add_argument("--version", action="version", version=f"busi {__version__}")
    sub = root.add_subparsers(dest="command", required=True)

    p = sub.add_parser("split", help="cut a labelled folder into adapt/ and test/ parts by patient (for `busi "
                                     "calibrate`/`finetune` on one, `busi evaluate` on the other)")
    p.add_argument("data", help="labelled folder, one sub-folder per class")
    p.add_argument("--out", required=True, help="folder to write adapt/, test/ (and adapt.csv, test.csv) into")
    p.add_argument("--test-size", type=float, default=0.5, help="share of the images in test/ (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same cut (default 0)")
    p.add_argument("--meta", help="CSV with a row per image (its rows follow their images)")
    p.add_argument("--id-column", default="ID", help="its column of file names without extension (default: ID)")
    p.add_argument("--patient-column", help="its patient column: a patient's images stay on one side")
    p.add_argument("--overwrite", action="store_true", help="replace an --out folder that already holds files")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    p = sub.add_parser("audit", help="count images, find near-duplicates and label conflicts")
    p.add_argument("data", help="dataset folder with one sub-folder per class")
    p.add_argument("--classes", nargs="+", help="class folder names (default: every sub-folder)")
    p.add_argument("--out", help="folder for audit.json (default: runs/<timestamp>-audit)")
    p.add_argument("--overwrite", action="store_true", help="write into an --out folder that already holds files")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    p = sub.add_parser("train", help="train models on a grouped train/test split and evaluate them")
    _add_run_options(p)
    p.add_argument("--test-size", type=float, help="share of images in the test part (default 0.3)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out from its last checkpoint")

    p = sub.add_parser("cv", help="k-fold cross-validation (grouped by near-duplicates) with confidence intervals")
    _add_run_options(p)
    p.add_argument("--folds", type=int, help="number of folds (default 5)")
    p.add_argument("--repeats", type=int, help="repeat the k-fold split with other seeds (default 1)")
    p.add_argument("--external", help="another hospital's folder (e.g. busbra_dev: benign and malignant) that every fold's "
                                      "model also scores; cv_metrics.json gets its figures beside the cross-validated ones")
    p.add_argument("--external-meta", help="CSV with a row per --external image (e.g. bus_data.csv)")
    p.add_argument("--external-id-column", help="its column of file names without extension (default: ID)")
    p.add_argument("--external-patient-column", help="its patient column (e.g. Case): CIs resample patients")
    p.add_argument("--external-group-column", help="its column to break figures down by (e.g. Device)")
    p.add_argument("--keep-fold-models", action="store_true", help="save each fold's model as "
                   "<model>/repeatR-foldK/checkpoint.pth (with --split source: a model of the other hospitals)")

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on every image of a folder")
    p.add_argument("--checkpoint", help="checkpoint.pth (default: the bundled model, see `busi model`)")
    p.add_argument("--data", required=True, help="folder of images the model never saw, one sub-folder per class "
                                                 "(all of the model's classes or some of them)")
    p.add_argument("--train-data", help="the folder the model trained on, if not where the checkpoint says: its "
                                         "near-duplicates in --data are reported and scored apart")
    p.add_argument("--meta", help="CSV with a row per image (e.g. BUS-BRA's bus_data.csv), for per-group figures and "
                                  "patient-level confidence intervals")
    p.add_argument("--id-column", default="ID", help="the meta column holding each image's file name without "
                                                     "extension (default: ID)")
    p.add_argument("--group-column", help="meta column to break every figure down by (e.g. Device: per scanner)")
    p.add_argument("--patient-column", help="meta column naming the patient (e.g. Case): CIs resample patients")
    p.add_argument("--out", help="results folder (default: runs/<timestamp>-evaluate-<model>)")
    p.add_argument("--overwrite", action="store_true", help="write into an --out folder that already holds files")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--engine", choices=("auto", "torch", "onnx"), default="auto", help="what runs the network: "
                   "auto (ONNX Runtime where installed, once this checkpoint's export is cached or for 500 images or "
                   "more: the export takes a minute, once), torch or onnx")
    p.add_argument("--dicom-out", metavar="DIR", help="also write each DICOM image's result as DICOM (SR and SEG, "
                   "as predict --dicom-out does: one more pass over the folder's DICOM images)")
    p.add_argument("--compare", action="append", default=[], metavar="CHECKPOINT",
                   help="another model (e.g. the parent of a fine-tuned or calibrated one) scored on the same images: "
                        "both side by side at their own rules, with intervals, and which keeps its recall target "
                        "(repeatable; comparison.json)")

    p = sub.add_parser("predict", help="class and probabilities for images or folders of images")
    p.add_argument("--checkpoint", help="checkpoint.pth, or a model written by `busi export` (default: the bundled "
                                        "model, see `busi model`)")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders searched for images "
                                                                         "(masks left out)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--explain", action="store_true", help="also write a Grad-CAM overlay per image into --out")
    p.add_argument("--out", help="folder for the table (predictions.csv) and the --explain overlays (default with "
                   "--explain: runs/<timestamp>-predict); predict's own folder is written over by predict again")
    p.add_argument("--dicom-out", metavar="DIR", help="also write, per DICOM image, a DICOM Structured Report of the "
                   "result and a Segmentation of the lesion outlined, filed in the image's study (for its viewer or "
                   "PACS)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--engine", choices=("auto", "torch", "onnx"), default="auto", help="what runs the network: "
                   "auto (ONNX Runtime where installed, once this checkpoint's export is cached or for 500 images or "
                   "more: the export takes a minute, once), torch or onnx")

    p = sub.add_parser("pacs", help="classify a PACS's ultrasound images over DICOMweb and store each result back "
                                    "in its study (Structured Report and Segmentation)")
    p.add_argument("--url", required=True, help="the PACS's DICOMweb root (Orthanc: http://HOST:8042/dicom-web)")
    p.add_argument("--study", action="append", metavar="STUDY_UID", help="only this study (repeatable; default: every "
                                                                          "ultrasound study)")
    p.add_argument("--since", metavar="YYYYMMDD", help="only studies from this date on")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="keep going: look for new studies every SECONDS "
                   "(what is stored is skipped; an archive that is down is tried again; Ctrl-C or SIGTERM stops it)")
    p.add_argument("--checkpoint", help="checkpoint.pth (default: the bundled model, see `busi model`)")
    p.add_argument("--user", help="user name, where the PACS asks for one")
    p.add_argument("--password", help="its password (or set BUSI_PACS_PASSWORD)")
    p.add_argument("--out", help="run folder for pacs.csv (default: runs/<timestamp>-pacs)")
    p.add_argument("--overwrite", action="store_true", help="reuse a non-empty --out folder")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--engine", choices=("auto", "torch", "onnx"), default="auto", help="what runs the network")

    p = sub.add_parser("serve", help="a local web page to try a checkpoint (needs: pip install -e \".[app]\")")
    p.add_argument("--checkpoint", help="checkpoint.pth (default: the bundled model, see `busi model`)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")

    p = sub.add_parser("export", help="write a checkpoint as ONNX or TorchScript, preprocessing and class names inside")
    p.add_argument("--checkpoint", help="checkpoint.pth (default: the bundled model, see `busi model`)")
    p.add_argument("--format", required=True, help="onnx or torchscript")
    p.add_argument("--out", help="output file (default: beside the checkpoint, .onnx or .pt)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    p = sub.add_parser("finetune", help="train a trained model on briefly with your own labelled images (all of its "
                                        "classes or some)")
    p.add_argument("--checkpoint", help="the model to start from (default: the bundled model, see `busi model`)")
    p.add_argument("--data", action="append", help="your labelled images, one sub-folder per class (some of the model's "
                                                   "classes are enough); repeat to pool several folders")
    p.add_argument("--config", help="YAML file of settings (defaults: busi/finetune.py DEFAULTS; flags override it)")
    p.add_argument("--meta", action="append", help="CSV with a row per image, matched by file name (for --patient-column)")
    p.add_argument("--id-column", help="the meta column holding each image's file name without extension (default: ID)")
    p.add_argument("--patient-column", help="meta column naming the patient: a patient's images stay on one side of "
                                            "the validation split")
    p.add_argument("--epochs", type=int, help="epochs (default 8)")
    p.add_argument("--lr", type=float, help="learning rate (default 5e-05)")
    p.add_argument("--batch-size", type=int, help="images per step (default 32)")
    p.add_argument("--val-size", type=float, help="share kept aside (grouped) to re-set the malignant threshold (default 0.2)")
    p.add_argument("--malignant-recall", type=float, help="the recall the re-set threshold aims for (default 0.9)")
    p.add_argument("--seed", type=int, help="seed of the split and training (default 0)")
    p.add_argument("--precision", help="auto (default), 32-true, bf16-mixed … (Lightning)")
    p.add_argument("--accelerator", help="cpu, gpu, mps or auto (default auto; Lightning)")
    p.add_argument("--out", help="run folder (default: runs/<timestamp>-finetune)")
    p.add_argument("--overwrite", action="store_true", help="write into an --out folder that already holds a run")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    p = sub.add_parser("adapt", help="label-free adaptation to a new scanner: the model's BatchNorm statistics measured "
                                     "on its images")
    p.add_argument("--checkpoint", help="the model to adapt (default: the bundled model, see `busi model`)")
    p.add_argument("--data", required=True, action="append", help="images of the new scanner or hospital (folders are "
                                                                    "searched; labels, if any, are not used)")
    p.add_argument("--out", help="folder for the adapted checkpoint.pth (default: runs/<timestamp>-adapt)")
    p.add_argument("--overwrite", action="store_true", help="write into an --out folder that already holds files")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    p = sub.add_parser("listen", help="a DICOM node (storage SCP): classifies the ultrasound images sent to it, results "
                                      "to a folder or back to the archive")
    p.add_argument("--port", type=int, required=True, help="TCP port to listen on (e.g. 11112)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; "
                   "0.0.0.0 for the hospital's network)")
    p.add_argument("--ae-title", default="BUSI", help="this node's AE title (default BUSI)")
    p.add_argument("--allow-ae", action="append", default=[], metavar="TITLE", required=True,
                   help="a calling AE title that may send (repeatable): associations from any other are refused")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="write each image's SR and SEG into this folder")
    where.add_argument("--to", metavar="URL", help="store each image's SR and SEG in this archive (DICOMweb root, "
                       "e.g. http://PACS:8042/dicom-web; STOW-RS)")
    p.add_argument("--spool", help="folder holding received images until their results are delivered (default: "
                   "OUT/spool, or ./busi-spool with --to)")
    p.add_argument("--checkpoint", help="the model (default: the bundled model)")
    p.add_argument("--engine", choices=("auto", "torch", "onnx"), default="auto", help="what runs the network")
    p.add_argument("--user", help="user name for --to, if the archive asks for one (password: $BUSI_PACS_PASSWORD)")

    p = sub.add_parser("orthanc", help="write a plugin for Orthanc's Python plugin: Orthanc calls busi on each "
                                       "ultrasound image it stores")
    p.add_argument("--out", required=True, help="folder for busi_orthanc.py and busi-orthanc.json (its configuration)")
    p.add_argument("--checkpoint", help="the model (default: the bundled model)")
    p.add_argument("--engine", choices=("auto", "torch", "onnx"), default="auto", help="what runs the network")

    p = sub.add_parser("calibrate", help="re-set the decision rule on your own labelled images (a lesion-first model: "
                                         "both thresholds, fitted together as the bundled rule was)")
    p.add_argument("--checkpoint", help="the model (default: the bundled model, see `busi model`)")
    p.add_argument("--data", required=True, help="labelled images, one sub-folder per class (some of the model's "
                                                 "classes are enough; malignant ones are needed)")
    p.add_argument("--malignant-recall", type=float, default=0.9, help="share of malignant images the rule must call "
                   "malignant (default 0.9; a cancer with no lesion found counts as missed); among the rules that keep "
                   "it, the one calling the most normal scans normal and benign lesions benign")
    p.add_argument("--max-lesions-called-normal", type=float, help="a model that decides from its lesion outline: the "
                   "largest share of lesions (benign and malignant) the rule may call normal (default: the model's, 0.1)")
    p.add_argument("--meta", help="CSV with a row per image, for --patient-column")
    p.add_argument("--id-column", default="ID", help="its column of file names without extension (default: ID)")
    p.add_argument("--patient-column", help="meta column naming the patient: the interval resamples patients")
    p.add_argument("--out", help="folder for the re-set checkpoint.pth (default: runs/<timestamp>-calibrate)")
    p.add_argument("--overwrite", action="store_true", help="write into an --out folder that already holds files")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    p = sub.add_parser("model", help="what the bundled model is, what to expect elsewhere, its decision rule")
    p.add_argument("--full", action="store_true", help="the whole card: data, recipe, figures, intended use and limits")

    p = sub.add_parser("report", help="rebuild report.html of a run folder from its files")
    p.add_argument("run", metavar="RUN_DIR", help="a folder written by train, cv or evaluate")
    return root


NO_DATA = ("no data folder: pass --data DATA, e.g. BUSI's Dataset_BUSI_with_GT (https://doi.org/10.1016/j.dib.2019.104863; "
           "on Kaggle as 'Breast Ultrasound Images Dataset'), or try the bundled model: busi predict examples/")


def _overrides(args) -> dict:
    return {k: getattr(args, k) for k in RUN_KEYS if getattr(args, k, None) is not None}


def _print_metrics(name: str, m: dict) -> None:
    recalls = ", ".join(f"{c} {v['recall']:.2f}" for c, v in m["per_class"].items() if v["recall"] is not None)
    auroc = "–" if m["auroc"] is None else f"{m['auroc']:.3f}"
    print(f"{name}: accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}, AUROC {auroc} "
          f"(n={m['n']}; recall {recalls}; always-majority baseline {m['majority_baseline']:.3f})")


def _seed_experiment(cfg) -> None:
    """`busi train --data DATA` alone: say what it trains; offline, train what needs no download."""
    print(f"busi: no --config or --model: the seed experiment, {' and '.join(cfg.models)} for {cfg.epochs} epochs each on a "
          f"{1 - cfg.test_size:.0%}/{cfg.test_size:.0%} split (about an hour on two CPU cores); the model to use is "
          "--config configs/recommended.yaml", file=sys.stderr)
    if "resnet50" in cfg.models and cfg.pretrained and cfg.weights is None:
        from .weights import imagenet_state_dict
        try:
            imagenet_state_dict("resnet50")  # torchvision downloads it once, into its cache
        except BusiError as e:
            cfg.models = [m for m in cfg.models if m != "resnet50"]
            print(f"busi: warning: ResNet-50 left out: {str(e).split(': ', 1)[1].split(';')[0]}; to train it offline pass "
                  "--model resnet50 --weights resnet50.pth (a local ImageNet state dict) or --no-pretrained",
                  file=sys.stderr)


def _caution(cfg) -> None:
    from .config import cautions
    for line in cautions(cfg):
        print(f"busi: warning: {line}", file=sys.stderr)


def _print_finetuned(path: Path) -> None:
    from .checkpoint import read
    from .operating import describe
    config = read(path)["config"]
    print(f"fine-tuned from {config['parent']['checkpoint']} in {config['train_seconds']:.0f} s; decision rule: "
          f"{describe(config.get('operating_point'))}")
    op = config.get("operating_point") or {}
    if op.get("cross_fit_folds"):
        ci = op.get("recall_ci")
        print(f"malignant recall to expect on new patients like these: {op['expected_recall']:.3f}"
              + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "") + f" ({op['ci_method']})")
    print(f"wrote {path}; measure it beside its parent on patients it never saw: busi evaluate --checkpoint {path} "
          f"--compare {config['parent']['checkpoint']} --data HELDOUT")


def _write_predictions(path: Path, rows: list[dict]) -> None:
    """predict's table as CSV: a row per image (an error in its own column), the decision's basis, the outline."""
    import csv
    ok = [r for r in rows if "error" not in r]
    classes = list(ok[0]["probabilities"]) if ok else []
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "predicted", *[f"p_{c}" for c in classes], "basis", "lesion_score", "lesion",
                         "outside_training", "frame", "frames", "explanation", "error"])
        for r in rows:
            if "error" in r:
                writer.writerow([r["path"], *[""] * (len(classes) + 8), r["error"]])
                continue
            writer.writerow([r["path"], r["predicted"], *[r["probabilities"][c] for c in classes],
                             r.get("basis", {}).get("text", ""), (r.get("lesion") or {}).get("score", ""),
                             _lesion_cell(r["lesion"]) if "lesion" in r else "",
                             {True: "yes", False: "no"}.get(r.get("outside_training"), ""), r.get("frame", ""),
                             r.get("frames", ""), r.get("explanation", ""), ""])


def _lesion_cell(lesion: dict) -> str:
    if not lesion.get("box"):
        return "none found"
    if "width_mm" in lesion:
        return f"{lesion['width_mm']:.1f} x {lesion['depth_mm']:.1f} mm, {lesion['depth_to_width']:.2f}"
    return f"{lesion['width_px']} x {lesion['depth_px']} px, {lesion['depth_to_width']:.2f}"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from .runs import discard_unfinished, finished
    finished()  # folders begun before this command (a library caller's runs) are never this command's to remove
    try:
        code = _dispatch(args)
        finished()
        return code
    except BusiError as e:
        print(f"busi: error: {e}", file=sys.stderr)
        _say_discarded(discard_unfinished())
        return 2
    except KeyboardInterrupt:
        print("busi: interrupted", file=sys.stderr)
        _say_discarded(discard_unfinished())
        return 130


def _say_discarded(folders) -> None:
    for folder in folders:
        print(f"busi: removed the unfinished run folder {folder}", file=sys.stderr)


def _check_before_imports(args):
    """Arguments, config and paths, checked with no torch imported, so a mistake is answered in well under a second.

    -> the config of train and cv (None for the other commands)."""
    from .config import SPLIT_SOURCE_TRAIN, make_config
    from .folders import scan, scan_sources
    from .meta import check_columns
    cfg = None
    if args.command in ("train", "cv"):
        cfg = make_config(_overrides(args), args.config)
        if not cfg.data:
            raise BusiError(NO_DATA)
        if args.command == "train" and cfg.split == "source":
            raise BusiError(SPLIT_SOURCE_TRAIN)
        _caution(cfg)
        if cfg.split == "source" and len(cfg.data) < 2:
            raise BusiError(f"--split source holds out one whole source at a time: it needs two or more --data folders "
                            f"(got one: {cfg.data[0]})")
        found = scan_sources(cfg.data, cfg.classes)  # a missing, empty or mistaken folder; the run scans it again: cheap
        if len(found.classes) < 2:
            raise BusiError(f"{cfg.data[0]}: holds one class folder ({found.classes[0]}); a classifier needs images of at "
                            "least two classes, one sub-folder each")
        if cfg.external:
            scan(cfg.external)
        for meta in cfg.meta:
            check_columns(meta, [cfg.id_column, cfg.patient_column, cfg.group_column])
        if cfg.external_meta:
            check_columns(cfg.external_meta, [cfg.external_id_column, cfg.external_patient_column,
                                              cfg.external_group_column])
    if args.command == "finetune":
        if not args.data:
            raise BusiError("no data folder: pass --data MY_LABELLED (one sub-folder per class, e.g. benign/ and malignant/)")
        scan_sources(args.data)
        for meta in args.meta or []:
            check_columns(meta, [getattr(args, "id_column", None) or "ID", getattr(args, "patient_column", None),
                                 getattr(args, "group_column", None)])
    if args.command in ("evaluate", "calibrate"):
        scan(args.data)
        if (getattr(args, "group_column", None) or args.patient_column) and not args.meta:
            raise BusiError("--group-column and --patient-column need --meta FILE.csv")
        if args.meta:
            check_columns(args.meta, [args.id_column, args.patient_column, getattr(args, "group_column", None)])
        for other in getattr(args, "compare", []):
            if not Path(other).is_file():
                raise BusiError(f"{other}: --compare model file does not exist")
    if args.command == "audit":
        scan(args.data, args.classes)
    if args.command == "pacs":
        import re
        if not re.match(r"https?://[^/]+", args.url):
            raise BusiError(f"{args.url}: --url takes the PACS's DICOMweb root, e.g. http://HOST:8042/dicom-web")
        if args.since and not re.fullmatch(r"\d{8}", args.since):
            raise BusiError(f"--since {args.since}: a date as YYYYMMDD, e.g. 20261201")
        import os
        from .pacs import Archive
        args.password = args.password or os.environ.get("BUSI_PACS_PASSWORD")
        Archive(args.url, args.user, args.password).probe()
    if args.command == "adapt":
        for item in args.data:
            if not Path(item).exists():
                raise BusiError(f"{item}: does not exist")
    checkpoint_path = getattr(args, "checkpoint", None)
    if checkpoint_path and Path(checkpoint_path).suffix not in (".onnx", ".pt", ".ts"):  # exported models: by name only
        from .checkpoint import peek
        peek(checkpoint_path)
    for name, what in (("checkpoint", "model file"), ("train_data", "--train-data folder"), ("meta", "meta CSV")):
        value = getattr(args, name, None)
        if isinstance(value, str) and not Path(value).exists():  # train and cv's --meta, a list, was checked above
            raise BusiError(f"{value}: {what} does not exist")
    for item in getattr(args, "inputs", None) or []:  # predict
        if not Path(item).exists():
            raise BusiError(f"{item}: no such image or folder")
    if args.command == "predict":  # at once, not after the model has loaded: nothing to read is known from the files
        from .folders import image_files, unreadable
        files = image_files(args.inputs)
        if not files:
            raise BusiError("no images found in " + ", ".join(args.inputs))
        bad = {f: why for f in files if (why := unreadable(f))}
        if len(bad) == len(files):
            raise BusiError("; ".join(f"{f}: {why}" for f, why in list(bad.items())[:3])
                            + (f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""))
    return cfg


def _dispatch(args) -> int:
    cfg = _check_before_imports(args)
    if args.command != "model":
        from .compat import check_torch
        check_torch()
    # Each command imports what it needs, late: argument errors stay fast, and nothing that only uses a trained model
    # imports the training stack (Lightning).

    if getattr(args, "checkpoint", "unset") is None:  # left out: the model that ships with busi
        from .bundled import default_checkpoint
        args.checkpoint = str(default_checkpoint())
    return COMMANDS[args.command](args, cfg) or 0


def _finetune(args, cfg) -> int | None:
    """busi finetune."""
    from . import workflow
    from .finetune import finetune_config
    cfg = finetune_config(args.checkpoint, _overrides(args), args.config)
    _caution(cfg)
    folder = workflow.run_train(cfg, args.out or workflow.run_dir(None, "finetune"), args.overwrite,
                                progress=args.progress)
    from .finetune import cross_fitted_rule
    cross_fitted_rule(cfg, folder, progress=args.progress)
    _print_finetuned(folder / cfg.models[0] / "checkpoint.pth")


def _adapt(args, cfg) -> int | None:
    """busi adapt."""
    from .adapt import run_adapt
    record, folder = run_adapt(args.checkpoint, args.data, args.out, args.overwrite, args.progress)
    print(f"adapted to {record['n_images']} images of {', '.join(args.data)}: BatchNorm statistics re-estimated, "
          f"no labels used; wrote {folder / 'checkpoint.pth'}")
    which = ("the parent's threshold for adapted models (fitted on adapted models' predictions at hospitals they "
             "never saw)" if "operating_point" in record else "the parent's")
    print(f"its decision threshold is {which}: re-set it on labelled images of this hospital with "
          f"`busi calibrate --checkpoint {folder / 'checkpoint.pth'} --data LABELLED`")


def _calibrate(args, cfg) -> int | None:
    """busi calibrate."""
    from .adapt import run_calibrate
    record, folder = run_calibrate(args.checkpoint, args.data, args.malignant_recall, args.out, args.overwrite,
                                   args.meta, args.id_column, args.patient_column, args.progress,
                                   args.max_lesions_called_normal)
    op, before = record["operating_point"], record["previous_operating_point"]
    if "previous_lesion_threshold" in op:
        at = op["where_fitted"]
        print(f"lesion threshold {op['lesion_threshold']:.3f} (was {op['previous_lesion_threshold']:.3f}) and threshold "
              f"on p(malignant | lesion) {op['threshold']:.3f} (was {before['threshold']:.3f}), fitted together on "
              f"{op['fitted_on']} images of {args.data}: there the rule calls {at['malignant_recall']:.1%} of "
              f"{op['fitted_on_positives']} malignant images malignant"
              + (f", {at['normal_recall']:.1%} of {op['fitted_on_normals']} normal scans normal" if at["normal_recall"]
                 is not None else "") + (f", {at['benign_called_benign']:.1%} of benign lesions benign"
                                          if at["benign_called_benign"] is not None else "")
              + f" and {at['lesions_called_normal']:.1%} of lesions normal")
        promise = op["cross_fitted"]
        if promise["malignant_recall"] is not None:
            ci = promise["recall_ci"]
            print(f"what to expect on new patients like these (the rule cross-fitted over {promise['folds']} folds of "
                  f"them): malignant recall {promise['malignant_recall']:.3f}"
                  + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
                  + (f", normal scans called normal {promise['normal_recall']:.3f}" if promise["normal_recall"]
                     is not None else "")
                  + (f", specificity {promise['specificity']:.3f}" if promise["specificity"] is not None else ""))
            if promise["malignant_recall"] < args.malignant_recall:
                print(f"busi: warning: cross-fitted, the rule finds {promise['malignant_recall']:.1%} of the cancers, "
                      f"below the {args.malignant_recall:.0%} asked for: expect less than {args.malignant_recall:.0%} "
                      "on new patients, or label more malignant images", file=sys.stderr)
    else:
        was = (f" (was {before['threshold']:.3f}, which found {record['previous_recall_here']:.1%} of them here)"
               if before else "")
        ci = op["recall_ci"]
        others = op.get("others_called_malignant")
        print(f"threshold on p(malignant) {op['threshold']:.3f}{was}: finds {op['recall_where_fitted']:.1%} of the "
              f"{op['fitted_on_positives']} malignant images of {args.data}"
              + (f", and calls {others:.1%} of the others malignant" if others is not None else
                 "; no benign or normal images there, so what it does to them is not measured"))
        if ci:
            print(f"recall to expect on new patients like these: {op['expected_recall']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] "
                  f"({op['ci_method']})")
    print(f"wrote {folder / 'checkpoint.pth'}; next, measure it on patients these images are not of: busi evaluate "
          f"--checkpoint {folder / 'checkpoint.pth'} --data TEST_PART (what is left after that: busi finetune, when it "
          "still falls short)")


def _model(args, cfg) -> int | None:
    """busi model."""
    from .bundled import card_summary, card_text, for_terminal
    print(for_terminal(card_text()) if args.full else card_summary())


def _audit(args, cfg) -> int | None:
    """busi audit."""
    from .audit import run_audit, summary
    result, folder = run_audit(args.data, args.out, args.classes, args.overwrite, args.progress)
    print(summary(result))
    print(f"wrote {folder / 'audit.json'}")


def _train(args, cfg) -> int | None:
    """busi train."""
    from . import workflow
    if args.config is None and not args.models:
        workflow.run_dir(args.out, "seed", args.overwrite, args.resume)  # a folder it may not write: said first
        _seed_experiment(cfg)
    if args.resume and workflow.run_finished(args.out, cfg):
        print(f"{args.out}: this run already finished; nothing to resume (its files are unchanged)")
        return 0
    folder = workflow.run_train(cfg, args.out, args.overwrite, args.resume, args.progress)
    if not workflow.is_main_process():
        return 0
    if cfg.test_size == 0:
        print(f"no test part (test_size 0); measure on images the model never saw with "
              f"`busi evaluate --checkpoint {folder}/{cfg.models[0]}/checkpoint.pth --data HELDOUT`")
        print(f"results in {folder}/ (<model>/checkpoint.pth, history.csv, loss.png); report: {folder / 'report.html'}")
        return 0
    for arch in cfg.models:
        _print_metrics(arch, json.loads((folder / arch / "metrics.json").read_text()))
    print(f"results in {folder}/ (summary.md, loss.png, <model>/metrics.json, checkpoint.pth); report: {folder / 'report.html'}")


def _cv(args, cfg) -> int | None:
    """busi cv."""
    from .crossval import format_cv, run_cv
    folder = run_cv(cfg, args.out, args.overwrite, args.progress, keep_models=args.keep_fold_models)
    print(format_cv(json.loads((folder / "cv_metrics.json").read_text())))
    print(f"results in {folder}/ (cv_metrics.json, fold_metrics.csv, oof_predictions.csv); report: {folder / 'report.html'}")


def _evaluate(args, cfg) -> int | None:
    """busi evaluate: the report's leading sentences, then the figures behind them."""
    from .evaluate import run_evaluate
    from .report import interval_text, lead
    metrics, folder = run_evaluate(args.checkpoint, args.data, args.out, args.overwrite, args.progress,
                                   args.train_data, args.meta, args.id_column, args.group_column,
                                   args.patient_column, args.engine)
    for line in lead(metrics, args.data):
        print(line)
    print("figures behind it:")
    _print_metrics(f"  {metrics['model']} (most probable class)", metrics)
    if metrics.get("absent_classes"):
        print(f"  no {', '.join(metrics['absent_classes'])} images here: figures are over the classes present")
    mvb = metrics.get("malignant_vs_benign")
    if mvb and mvb.get("auroc"):
        a = mvb["auroc"]
        line = f"  malignant vs benign: AUROC {a['estimate']:.3f} {interval_text(a, mvb)}"
        for at in ("argmax", "operating_point"):
            if mvb.get(f"sensitivity_{at}"):
                line += (f"; at {at.replace('_', ' ')}: sensitivity {mvb[f'sensitivity_{at}']['estimate']:.3f}, "
                         f"specificity {mvb[f'specificity_{at}']['estimate']:.3f}")
        print(line + f" ({mvb['ci_method']})")
    overlap = metrics["training_overlap"]
    if overlap["checked"] and overlap["n_with_near_duplicate_in_training"]:
        rest = overlap.get("metrics_without_them")
        if rest:
            print(f"  without the {overlap['n_with_near_duplicate_in_training']} near-copies of training images "
                  f"(listed in metrics.json; n={rest['n']}): accuracy {rest['accuracy']:.3f}, macro-F1 "
                  f"{rest['macro_f1']:.3f}, " + ", ".join(f"recall {c} {v:.2f}" for c, v in rest["recall"].items()
                                                          if v is not None))
    if args.compare:
        import json
        from .compare import compare, lines
        patients = None
        if args.meta and args.patient_column:
            from .data import scan
            from .meta import read_meta
            paths = [s.path for s in scan(args.data).samples]
            rows, _ = read_meta(args.meta, args.id_column, [args.patient_column], paths)
            patients = [rows.get(p, {}).get(args.patient_column) or f"image:{p}" for p in paths]
        # each model named by its file, or by its path where two files share a name (checkpoint.pth)
        paths = [args.checkpoint, *args.compare]
        named = [Path(p).name for p in paths]
        side = compare({(n if named.count(n) == 1 else p): p for n, p in zip(named, paths)}, args.data, patients,
                       args.engine, args.progress)
        (folder / "comparison.json").write_text(json.dumps(side, indent=2) + "\n")
        print("side by side on the same images, each at its own decision rule:")
        for line in lines(side):
            print(line)
    print(f"results in {folder}/; report: {folder / 'report.html'}")
    if args.dicom_out:
        from .folders import is_dicom_file, scan
        from .inference import run_predict
        found = scan(args.data)
        files = [found.file(s) for s in found.samples if is_dicom_file(found.file(s))]
        rows = run_predict(args.checkpoint, files, progress=args.progress, engine=args.engine)
        return 1 if _dicom_out(args, rows)["failed"] else 0


def _dicom_out(args, rows: list[dict]) -> dict:
    """--dicom-out of predict and evaluate: the SR and SEG of each row from a DICOM image, and one line saying so."""
    from .dicom_out import write_for_rows
    from .inference import config_of
    done = write_for_rows(rows, args.checkpoint, config_of(args.checkpoint), args.dicom_out)
    print(f"busi: {len(done['files'])} DICOM result file(s) (SR, and SEG where a lesion was outlined) in "
          f"{args.dicom_out}/" + (f"; {len(done['not_dicom'])} image(s) are not DICOM, so have no study to be filed in: "
                                  "none for them" if done["not_dicom"] else ""), file=sys.stderr)
    for line in done["failed"]:
        print(f"busi: error: {line}", file=sys.stderr)
    return done


def _predict(args, cfg) -> int | None:
    """busi predict."""
    from .inference import operating_point_of, run_predict
    from .runs import run_dir
    explain_dir = None
    if args.explain or args.out:
        # predict's own folder (its table, and its overlays) is written over by predict again: the README's try works
        # twice; a folder holding anything else is refused as before
        mine = args.out and Path(args.out).is_dir() and all(
            p.name == "predictions.csv" or p.name.endswith("-gradcam.png") for p in Path(args.out).iterdir())
        explain_dir = run_dir(args.out, "predict", overwrite=bool(mine))
        for old in explain_dir.glob("*-gradcam.png") if mine else ():
            old.unlink()
    rows = run_predict(args.checkpoint, args.inputs, explain_dir if args.explain else None, progress=args.progress,
                       engine=args.engine)
    if explain_dir is not None:
        _write_predictions(explain_dir / "predictions.csv", rows)
        print(f"busi: the table in {explain_dir / 'predictions.csv'}", file=sys.stderr)
    done = _dicom_out(args, rows) if args.dicom_out else {"failed": []}
    operating_point = operating_point_of(args.checkpoint)
    if operating_point:
        from .operating import describe
        print(f"busi: decision rule: {describe(operating_point)}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        ok = [r for r in rows if "error" not in r]
        if ok:
            classes = list(ok[0]["probabilities"])
            lesion, shifted = "lesion" in ok[0], "outside_training" in ok[0]
            print("\t".join(["image", "predicted", *classes, *(["lesion (width x depth, depth/width)"] * lesion),
                             *(["unlike training images"] * shifted)]))
            for r in ok:
                where = f" (loop: frame {r['frame']} of {r['frames']})" if "frames" in r else ""
                print("\t".join([r["path"] + where, r["predicted"], *[f"{r['probabilities'][c]:.3f}" for c in classes],
                                 *([_lesion_cell(r["lesion"])] if lesion else []),
                                 *((["yes" if r["outside_training"] else "no"]) if shifted else [])]))
    flagged = [r for r in rows if r.get("outside_training")]
    if flagged:  # the same words as the web page, and the count --json and the table mark
        from .app import OUTSIDE
        print(f"busi: {len(flagged)} of {sum('error' not in r for r in rows)} images are unlike the images this model "
              f"trained on (about 5% of images like them would be): {OUTSIDE[OUTSIDE.index(':') + 2:]}", file=sys.stderr)
    for r in rows:
        if "error" in r:
            print(f"busi: error: {r['error']}", file=sys.stderr)
    if not rows:
        raise BusiError("no images found in " + ", ".join(args.inputs))
    if explain_dir is not None:
        print(f"Grad-CAM overlays in {explain_dir}/", file=sys.stderr)
    return 1 if any("error" in r for r in rows) or done["failed"] else 0


def _pacs(args, cfg) -> int | None:
    """busi pacs."""
    from .pacs import run_pacs, watch
    if args.watch is not None:
        if args.watch <= 0 or args.study:
            raise BusiError("--watch takes a number of seconds above 0, and watches every ultrasound study (--since "
                            "narrows it; --study does not go with it)")
        done = watch(args.checkpoint, args.url, args.watch, args.since, args.out, args.overwrite, args.engine,
                     args.user, args.password)
        print(f"stopped after {done['polls']} look(s): {done['classified_and_stored']} image(s) classified and their "
              f"results stored, {done['failed']} failed, the archive down {done['archive_down']} time(s). Run folder: "
              f"{done['folder']}/")
        return 1 if done["failed"] else 0
    summary, folder = run_pacs(args.checkpoint, args.url, args.study, args.since, args.out, args.overwrite,
                               args.progress, args.engine, args.user, args.password)
    skipped = summary["skipped"]
    own = skipped.get("busi's own results", 0)
    print(f"{summary['classified_and_stored']} image(s) of {summary['studies']} studies classified, their results "
          f"stored in their studies ({', '.join(f'{n} {c}' for c, n in summary['predicted'].items())}); "
          f"{skipped['already stored']} image(s) had results from this model already ({own} of its own results left "
          f"alone), {skipped['not an image']} other object(s) were not images; {summary['failed']} failed (pacs.csv "
          f"says why). Run folder: {folder}/")
    return 1 if summary["failed"] else 0


def _listen(args, cfg) -> int | None:
    """busi listen."""
    import os
    from .listen import listen
    for title in [args.ae_title, *args.allow_ae]:
        if not 0 < len(title) <= 16:
            raise BusiError(f"AE title '{title}': 1 to 16 characters")
    listen(args.checkpoint, args.port, args.allow_ae, args.out, args.to, args.host, args.ae_title,
           args.spool or (None if args.out else "busi-spool"), args.engine, args.user,
           os.environ.get("BUSI_PACS_PASSWORD"))


def _orthanc(args, cfg) -> int | None:
    """busi orthanc."""
    from .orthanc import main_message, write_plugin
    print(main_message(*write_plugin(args.out, args.checkpoint, args.engine)))


def _serve(args, cfg) -> int | None:
    """busi serve."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise BusiError('the web app needs Gradio: pip install -e ".[app]"') from None
    from .app import serve
    serve(args.checkpoint, args.host, args.port)


def _export(args, cfg) -> int | None:
    """busi export."""
    from .export import export
    print(f"wrote {export(args.checkpoint, args.format, args.out, args.overwrite)}")
    from .inference import operating_point_of
    operating_point = operating_point_of(args.checkpoint)
    if operating_point:
        from .operating import describe
        print(f"its decision rule, kept in the file's metadata and applied by `busi predict`: {describe(operating_point)}")


def _split(args, cfg) -> int | None:
    """busi split."""
    from .partition import run_split
    summary = run_split(args.data, args.out, args.test_size, args.seed, args.meta, args.id_column,
                        args.patient_column, args.overwrite, args.progress)
    for part in ("adapt", "test"):
        s = summary[part]
        who = f" of {s['patients']} patients" if s["patients"] is not None else ""
        print(f"{args.out}/{part}/: {s['images']} images{who} ("
              + ", ".join(f"{c} {n}" for c, n in s["classes"].items()) + ")")
    print(f"grouped by {summary['grouped_by']}; next: `busi calibrate --data {args.out}/adapt …` (or finetune), then "
          f"`busi evaluate --data {args.out}/test …`")


def _report(args, cfg) -> int | None:
    """busi report."""
    from .report import render
    print(f"wrote {render(args.run)}")


COMMANDS = {"finetune": _finetune, "adapt": _adapt, "calibrate": _calibrate, "model": _model, "audit": _audit,
            "train": _train, "cv": _cv, "evaluate": _evaluate, "predict": _predict, "listen": _listen, "orthanc": _orthanc, "serve": _serve, "export": _export,
            "report": _report, "split": _split, "pacs": _pacs}


if __name__ == "__main__":
    sys.exit(main())
