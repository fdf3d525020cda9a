"""The `busi` command: one parser, each command's arguments, checks and call in its own module, one-line errors.

A command module (training, evaluating, predicting, local, archive, sharing) registers its sub-commands with
argparse and gives each a `check` (arguments, folders and files, answered with no torch imported) and a `run`
(imports what it needs, late, calls the library, prints). This module only parses, dispatches and turns a BusiError
or Ctrl-C into one line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import __version__
from ..errors import BusiError
from . import archive, evaluating, local, predicting, sharing, training
from .common import overrides

MODULES = (training, evaluating, predicting, local, archive, sharing)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="busi", description="Breast-ultrasound classifiers with honest, "
                                                            "duplicate-aware evaluation.")
    root.add_argument("--version", action="version", version=f"busi {__version__}")
    sub = root.add_subparsers(dest="command", required=True)
    for module in MODULES:
        module.register(sub)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from ..runs import discard_unfinished, finished
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


def _check_model_file(args) -> None:
    """A model file named on the command line exists and is a busi checkpoint: said before anything else is read."""
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint and Path(checkpoint).suffix not in (".onnx", ".pt", ".ts"):  # exported models: by name only
        from ..checkpoint import peek
        peek(checkpoint)
    elif checkpoint and not Path(checkpoint).exists():
        raise BusiError(f"{checkpoint}: model file does not exist")
    train_data = getattr(args, "train_data", None)
    if train_data and not Path(train_data).exists():
        raise BusiError(f"{train_data}: --train-data folder does not exist")


def _dispatch(args) -> int:
    _check_model_file(args)
    cfg = args.check(args) if getattr(args, "check", None) else None
    if getattr(args, "needs_torch", True):
        from ..compat import check_torch
        check_torch()
    if getattr(args, "checkpoint", "unset") is None:  # left out: the model that ships with busi
        from ..bundled import default_checkpoint
        args.checkpoint = str(default_checkpoint())
    return args.run(args, cfg) or 0


__all__ = ["main", "parser", "overrides"]
