"""busi pacs, listen and orthanc: busi inside the hospital's archive (DICOMweb, a DICOM node, an Orthanc plugin)."""
from __future__ import annotations

import os
import re

from ..errors import BusiError
from .common import add_engine, add_out

ENGINE = "what runs the network"


def register(sub) -> None:
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
    add_out(p, "run folder for pacs.csv (default: runs/<timestamp>-pacs)", "reuse a non-empty --out folder")
    add_engine(p, ENGINE)
    p.set_defaults(check=check_pacs, run=pacs)

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
    add_engine(p, ENGINE)
    p.add_argument("--user", help="user name for --to, if the archive asks for one (password: $BUSI_PACS_PASSWORD)")
    p.set_defaults(check=check_listen, run=listen)

    p = sub.add_parser("orthanc", help="write a plugin for Orthanc's Python plugin: Orthanc calls busi on each "
                                       "ultrasound image it stores")
    p.add_argument("--out", required=True, help="folder for busi_orthanc.py and busi-orthanc.json (its configuration)")
    p.add_argument("--checkpoint", help="the model (default: the bundled model)")
    add_engine(p, ENGINE)
    p.set_defaults(run=orthanc)


def check_pacs(args):
    """The URL and date are well formed and the archive answers, before a model is loaded."""
    if not re.match(r"https?://[^/]+", args.url):
        raise BusiError(f"{args.url}: --url takes the PACS's DICOMweb root, e.g. http://HOST:8042/dicom-web")
    if args.since and not re.fullmatch(r"\d{8}", args.since):
        raise BusiError(f"--since {args.since}: a date as YYYYMMDD, e.g. 20261201")
    if args.watch is not None and (args.watch <= 0 or args.study):
        raise BusiError("--watch takes a number of seconds above 0, and watches every ultrasound study (--since "
                        "narrows it; --study does not go with it)")
    from ..pacs import Archive
    args.password = args.password or os.environ.get("BUSI_PACS_PASSWORD")
    Archive(args.url, args.user, args.password).probe()


def check_listen(args):
    for title in [args.ae_title, *args.allow_ae]:
        if not 0 < len(title) <= 16:
            raise BusiError(f"AE title '{title}': 1 to 16 characters")


def pacs(args, cfg) -> int | None:
    from ..pacs import run_pacs, watch
    if args.watch is not None:
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


def listen(args, cfg) -> int | None:
    from ..listen import listen
    listen(args.checkpoint, args.port, args.allow_ae, args.out, args.to, args.host, args.ae_title,
           args.spool or (None if args.out else "busi-spool"), args.engine, args.user,
           os.environ.get("BUSI_PACS_PASSWORD"))


def orthanc(args, cfg) -> int | None:
    from ..orthanc import main_message, write_plugin
    print(main_message(*write_plugin(args.out, args.checkpoint, args.engine)))
