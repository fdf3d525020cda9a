"""busi audit, train and cv: a labelled folder checked, models trained on it, cross-validated."""
from __future__ import annotations

import json
import sys

from ..errors import BusiError
from .common import add_out, add_run_options, caution, overrides, print_metrics

NO_DATA = ("no data folder: pass --data DATA, e.g. BUSI's Dataset_BUSI_with_GT (https://doi.org/10.1016/j.dib.2019.104863; "
           "on Kaggle as 'Breast Ultrasound Images Dataset'), or try the bundled model: busi predict examples/")


def register(sub) -> None:
    p = sub.add_parser("audit", help="count images, find near-duplicates and label conflicts")
    p.add_argument("data", help="dataset folder with one sub-folder per class")
    p.add_argument("--classes", nargs="+", help="class folder names (default: every sub-folder)")
    add_out(p, "folder for audit.json (default: runs/<timestamp>-audit)")
    p.set_defaults(check=check_audit, run=audit)

    p = sub.add_parser("train", help="train models on a grouped train/test split and evaluate them")
    add_run_options(p)
    p.add_argument("--test-size", type=float, help="share of images in the test part (default 0.3)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out from its last checkpoint")
    p.set_defaults(check=check_run, run=train)

    p = sub.add_parser("cv", help="k-fold cross-validation (grouped by near-duplicates) with confidence intervals")
    add_run_options(p)
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
    p.set_defaults(check=check_run, run=cv)


def check_audit(args):
    from ..folders import scan
    scan(args.data, args.classes)


def check_run(args):
    """train's and cv's config, and its folders and CSVs, checked with no torch imported -> the config."""
    from ..config import SPLIT_SOURCE_TRAIN, make_config
    from ..folders import scan, scan_sources
    from ..meta import check_columns
    cfg = make_config(overrides(args), args.config)
    if not cfg.data:
        raise BusiError(NO_DATA)
    if args.command == "train" and cfg.split == "source":
        raise BusiError(SPLIT_SOURCE_TRAIN)
    caution(cfg)
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
        check_columns(cfg.external_meta, [cfg.external_id_column, cfg.external_patient_column, cfg.external_group_column])
    return cfg


def audit(args, cfg) -> int | None:
    from ..audit import run_audit, summary
    result, folder = run_audit(args.data, args.out, args.classes, args.overwrite, args.progress)
    print(summary(result))
    print(f"wrote {folder / 'audit.json'}")


def seed_experiment(cfg) -> None:
    """`busi train --data DATA` alone: say what it trains; offline, train what needs no download."""
    print(f"busi: no --config or --model: the seed experiment, {' and '.join(cfg.models)} for {cfg.epochs} epochs each on a "
          f"{1 - cfg.test_size:.0%}/{cfg.test_size:.0%} split (about an hour on two CPU cores); the model to use is "
          "--config configs/recommended.yaml", file=sys.stderr)
    if "resnet50" in cfg.models and cfg.pretrained and cfg.weights is None:
        from ..weights import imagenet_state_dict
        try:
            imagenet_state_dict("resnet50")  # torchvision downloads it once, into its cache
        except BusiError as e:
            cfg.models = [m for m in cfg.models if m != "resnet50"]
            print(f"busi: warning: ResNet-50 left out: {str(e).split(': ', 1)[1].split(';')[0]}; to train it offline pass "
                  "--model resnet50 --weights resnet50.pth (a local ImageNet state dict) or --no-pretrained",
                  file=sys.stderr)


def train(args, cfg) -> int | None:
    from .. import workflow
    if args.config is None and not args.models:
        workflow.run_dir(args.out, "seed", args.overwrite, args.resume)  # a folder it may not write: said first
        seed_experiment(cfg)
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
        print_metrics(arch, json.loads((folder / arch / "metrics.json").read_text()))
    print(f"results in {folder}/ (summary.md, loss.png, <model>/metrics.json, checkpoint.pth); report: {folder / 'report.html'}")


def cv(args, cfg) -> int | None:
    from ..crossval import format_cv, run_cv
    folder = run_cv(cfg, args.out, args.overwrite, args.progress, keep_models=args.keep_fold_models)
    print(format_cv(json.loads((folder / "cv_metrics.json").read_text())))
    print(f"results in {folder}/ (cv_metrics.json, fold_metrics.csv, oof_predictions.csv); report: {folder / 'report.html'}")
