"""busi evaluate: a model scored on a labelled folder it never saw, optionally beside other models."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import BusiError
from .common import add_engine, add_out, print_metrics
from .predicting import dicom_out


def register(sub) -> None:
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
    add_out(p, "results folder (default: runs/<timestamp>-evaluate-<model>)")
    add_engine(p)
    p.add_argument("--dicom-out", metavar="DIR", help="also write each DICOM image's result as DICOM (SR and SEG, "
                   "as predict --dicom-out does: one more pass over the folder's DICOM images)")
    p.add_argument("--compare", action="append", default=[], metavar="CHECKPOINT",
                   help="another model (e.g. the parent of a fine-tuned or calibrated one) scored on the same images: "
                        "both side by side at their own rules, with intervals, and which keeps its recall target "
                        "(repeatable; comparison.json)")
    p.set_defaults(check=check, run=evaluate)


def check(args):
    """The labelled folder, the CSV and its columns, the models to compare (shared with calibrate)."""
    from ..folders import scan
    from ..meta import check_columns
    scan(args.data)
    if (getattr(args, "group_column", None) or args.patient_column) and not args.meta:
        raise BusiError("--group-column and --patient-column need --meta FILE.csv")
    if args.meta:
        if not Path(args.meta).exists():
            raise BusiError(f"{args.meta}: meta CSV does not exist")
        check_columns(args.meta, [args.id_column, args.patient_column, getattr(args, "group_column", None)])
    for other in getattr(args, "compare", []):
        if not Path(other).is_file():
            raise BusiError(f"{other}: --compare model file does not exist")


def _print_figures(metrics: dict) -> None:
    from ..report import interval_text
    print("figures behind it:")
    print_metrics(f"  {metrics['model']} (most probable class)", metrics)
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


def _compare(args, folder: Path) -> None:
    """--compare: every model on the same images, each at its own rule; comparison.json."""
    from ..compare import compare, lines
    patients = None
    if args.meta and args.patient_column:
        from ..data import scan
        from ..meta import read_meta
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


def evaluate(args, cfg) -> int | None:
    """The report's leading sentences, then the figures behind them."""
    from ..evaluate import run_evaluate
    from ..report import lead
    metrics, folder = run_evaluate(args.checkpoint, args.data, args.out, args.overwrite, args.progress,
                                   args.train_data, args.meta, args.id_column, args.group_column,
                                   args.patient_column, args.engine)
    for line in lead(metrics, args.data):
        print(line)
    _print_figures(metrics)
    if args.compare:
        _compare(args, folder)
    print(f"results in {folder}/; report: {folder / 'report.html'}")
    if args.dicom_out:
        from ..folders import is_dicom_file, scan
        from ..inference import run_predict
        found = scan(args.data)
        files = [found.file(s) for s in found.samples if is_dicom_file(found.file(s))]
        rows = run_predict(args.checkpoint, files, progress=args.progress, engine=args.engine)
        return 1 if dicom_out(args, rows)["failed"] else 0
