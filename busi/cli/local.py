"""busi split, calibrate, finetune and adapt: a trained model made to fit one hospital's images."""
from __future__ import annotations

import sys
from pathlib import Path

from ..errors import BusiError
from .common import add_out, caution, overrides
from .evaluating import check as check_labelled


def register(sub) -> None:
    p = sub.add_parser("split", help="cut a labelled folder into adapt/ and test/ parts by patient (for `busi "
                                     "calibrate`/`finetune` on one, `busi evaluate` on the other)")
    p.add_argument("data", help="labelled folder, one sub-folder per class")
    p.add_argument("--test-size", type=float, default=0.5, help="share of the images in test/ (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same cut (default 0)")
    p.add_argument("--meta", help="CSV with a row per image (its rows follow their images)")
    p.add_argument("--id-column", default="ID", help="its column of file names without extension (default: ID)")
    p.add_argument("--patient-column", help="its patient column: a patient's images stay on one side")
    add_out(p, "folder to write adapt/, test/ (and adapt.csv, test.csv) into",
            "replace an --out folder that already holds files", required=True)
    p.set_defaults(check=check_split, run=split)

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
    add_out(p, "folder for the re-set checkpoint.pth (default: runs/<timestamp>-calibrate)")
    p.set_defaults(check=check_labelled, run=calibrate)

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
    add_out(p, "run folder (default: runs/<timestamp>-finetune)", "write into an --out folder that already holds a run")
    p.set_defaults(check=check_finetune, run=finetune)

    p = sub.add_parser("adapt", help="label-free adaptation to a new scanner: the model's BatchNorm statistics measured "
                                     "on its images")
    p.add_argument("--checkpoint", help="the model to adapt (default: the bundled model, see `busi model`)")
    p.add_argument("--data", required=True, action="append", help="images of the new scanner or hospital (folders are "
                                                                    "searched; labels, if any, are not used)")
    add_out(p, "folder for the adapted checkpoint.pth (default: runs/<timestamp>-adapt)")
    p.set_defaults(check=check_adapt, run=adapt)


def check_split(args):
    if args.meta and not Path(args.meta).exists():
        raise BusiError(f"{args.meta}: meta CSV does not exist")


def check_finetune(args):
    from ..folders import scan_sources
    from ..meta import check_columns
    if not args.data:
        raise BusiError("no data folder: pass --data MY_LABELLED (one sub-folder per class, e.g. benign/ and malignant/)")
    scan_sources(args.data)
    for meta in args.meta or []:
        check_columns(meta, [args.id_column or "ID", args.patient_column])


def check_adapt(args):
    for item in args.data:
        if not Path(item).exists():
            raise BusiError(f"{item}: does not exist")


def split(args, cfg) -> int | None:
    from ..partition import run_split
    summary = run_split(args.data, args.out, args.test_size, args.seed, args.meta, args.id_column,
                        args.patient_column, args.overwrite, args.progress)
    for part in ("adapt", "test"):
        s = summary[part]
        who = f" of {s['patients']} patients" if s["patients"] is not None else ""
        print(f"{args.out}/{part}/: {s['images']} images{who} ("
              + ", ".join(f"{c} {n}" for c, n in s["classes"].items()) + ")")
    print(f"grouped by {summary['grouped_by']}; next: `busi calibrate --data {args.out}/adapt …` (or finetune), then "
          f"`busi evaluate --data {args.out}/test …`")


def finetune(args, cfg) -> int | None:
    from .. import workflow
    from ..checkpoint import read
    from ..finetune import cross_fitted_rule, finetune_config
    from ..operating import describe
    cfg = finetune_config(args.checkpoint, overrides(args), args.config)
    caution(cfg)
    folder = workflow.run_train(cfg, args.out or workflow.run_dir(None, "finetune"), args.overwrite,
                                progress=args.progress)
    cross_fitted_rule(cfg, folder, progress=args.progress)
    path = folder / cfg.models[0] / "checkpoint.pth"
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


def adapt(args, cfg) -> int | None:
    from ..adapt import run_adapt
    record, folder = run_adapt(args.checkpoint, args.data, args.out, args.overwrite, args.progress)
    print(f"adapted to {record['n_images']} images of {', '.join(args.data)}: BatchNorm statistics re-estimated, "
          f"no labels used; wrote {folder / 'checkpoint.pth'}")
    which = ("the parent's threshold for adapted models (fitted on adapted models' predictions at hospitals they "
             "never saw)" if "operating_point" in record else "the parent's")
    print(f"its decision threshold is {which}: re-set it on labelled images of this hospital with "
          f"`busi calibrate --checkpoint {folder / 'checkpoint.pth'} --data LABELLED`")


def _print_lesion_rule(args, op: dict, before: dict) -> None:
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
    if promise["malignant_recall"] is None:
        return
    ci = promise["recall_ci"]
    print(f"what to expect on new patients like these (the rule cross-fitted over {promise['folds']} folds of "
          f"them): malignant recall {promise['malignant_recall']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
          + (f", normal scans called normal {promise['normal_recall']:.3f}" if promise["normal_recall"] is not None
             else "") + (f", specificity {promise['specificity']:.3f}" if promise["specificity"] is not None else ""))
    if promise["malignant_recall"] < args.malignant_recall:
        print(f"busi: warning: cross-fitted, the rule finds {promise['malignant_recall']:.1%} of the cancers, "
              f"below the {args.malignant_recall:.0%} asked for: expect less than {args.malignant_recall:.0%} "
              "on new patients, or label more malignant images", file=sys.stderr)


def calibrate(args, cfg) -> int | None:
    from ..adapt import run_calibrate
    record, folder = run_calibrate(args.checkpoint, args.data, args.malignant_recall, args.out, args.overwrite,
                                   args.meta, args.id_column, args.patient_column, args.progress,
                                   args.max_lesions_called_normal)
    op, before = record["operating_point"], record["previous_operating_point"]
    if "previous_lesion_threshold" in op:
        _print_lesion_rule(args, op, before)
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
