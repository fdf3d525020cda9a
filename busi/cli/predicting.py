"""busi predict: a class, its probabilities and the figure it rests on, per image; optionally overlays and DICOM."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import BusiError
from .common import add_engine, print_rule


def register(sub) -> None:
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
    add_engine(p)
    p.set_defaults(check=check, run=predict)


def check(args):
    """Every input exists and at least one is an image: said at once, not after the model has loaded."""
    from ..folders import image_files, unreadable
    for item in args.inputs:
        if not Path(item).exists():
            raise BusiError(f"{item}: no such image or folder")
    files = image_files(args.inputs)
    if not files:
        raise BusiError("no images found in " + ", ".join(args.inputs))
    bad = {f: why for f in files if (why := unreadable(f))}
    if len(bad) == len(files):
        raise BusiError("; ".join(f"{f}: {why}" for f, why in list(bad.items())[:3])
                        + (f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""))


def write_predictions(path: Path, rows: list[dict]) -> None:
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
                             lesion_cell(r["lesion"]) if "lesion" in r else "",
                             {True: "yes", False: "no"}.get(r.get("outside_training"), ""), r.get("frame", ""),
                             r.get("frames", ""), r.get("explanation", ""), ""])


def lesion_cell(lesion: dict) -> str:
    if not lesion.get("box"):
        return "none found"
    if "width_mm" in lesion:
        return f"{lesion['width_mm']:.1f} x {lesion['depth_mm']:.1f} mm, {lesion['depth_to_width']:.2f}"
    return f"{lesion['width_px']} x {lesion['depth_px']} px, {lesion['depth_to_width']:.2f}"


def dicom_out(args, rows: list[dict]) -> dict:
    """--dicom-out of predict and evaluate: the SR and SEG of each row from a DICOM image, and one line saying so."""
    from ..dicom_out import write_for_rows
    from ..inference import config_of
    done = write_for_rows(rows, args.checkpoint, config_of(args.checkpoint), args.dicom_out)
    print(f"busi: {len(done['files'])} DICOM result file(s) (SR, and SEG where a lesion was outlined) in "
          f"{args.dicom_out}/" + (f"; {len(done['not_dicom'])} image(s) are not DICOM, so have no study to be filed in: "
                                  "none for them" if done["not_dicom"] else ""), file=sys.stderr)
    for line in done["failed"]:
        print(f"busi: error: {line}", file=sys.stderr)
    return done


def _print_table(rows: list[dict]) -> None:
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return
    classes = list(ok[0]["probabilities"])
    lesion, shifted = "lesion" in ok[0], "outside_training" in ok[0]
    print("\t".join(["image", "predicted", *classes, *(["lesion (width x depth, depth/width)"] * lesion),
                     *(["unlike training images"] * shifted)]))
    for r in ok:
        where = f" (loop: frame {r['frame']} of {r['frames']})" if "frames" in r else ""
        print("\t".join([r["path"] + where, r["predicted"], *[f"{r['probabilities'][c]:.3f}" for c in classes],
                         *([lesion_cell(r["lesion"])] if lesion else []),
                         *((["yes" if r["outside_training"] else "no"]) if shifted else [])]))


def predict(args, cfg) -> int | None:
    from ..inference import run_predict
    from ..runs import run_dir
    out = None
    if args.explain or args.out:
        # predict's own folder (its table, and its overlays) is written over by predict again: the README's try works
        # twice; a folder holding anything else is refused as before
        mine = args.out and Path(args.out).is_dir() and all(
            p.name == "predictions.csv" or p.name.endswith("-gradcam.png") for p in Path(args.out).iterdir())
        out = run_dir(args.out, "predict", overwrite=bool(mine))
        for old in out.glob("*-gradcam.png") if mine else ():
            old.unlink()
    rows = run_predict(args.checkpoint, args.inputs, out if args.explain else None, progress=args.progress,
                       engine=args.engine)
    if out is not None:
        write_predictions(out / "predictions.csv", rows)
        print(f"busi: the table in {out / 'predictions.csv'}", file=sys.stderr)
    done = dicom_out(args, rows) if args.dicom_out else {"failed": []}
    print_rule(args.checkpoint, "busi: decision rule: ", sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows)
    flagged = [r for r in rows if r.get("outside_training")]
    if flagged:  # the same words as the web page, and the count --json and the table mark
        from ..app import OUTSIDE
        print(f"busi: {len(flagged)} of {sum('error' not in r for r in rows)} images are unlike the images this model "
              f"trained on (about 5% of images like them would be): {OUTSIDE[OUTSIDE.index(':') + 2:]}", file=sys.stderr)
    for r in rows:
        if "error" in r:
            print(f"busi: error: {r['error']}", file=sys.stderr)
    if not rows:
        raise BusiError("no images found in " + ", ".join(args.inputs))
    if out is not None and args.explain:
        print(f"Grad-CAM overlays in {out}/", file=sys.stderr)
    return 1 if any("error" in r for r in rows) or done["failed"] else 0
