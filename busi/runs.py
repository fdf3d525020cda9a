"""Run folders: where a command writes, and which process of a distributed run may write."""
from __future__ import annotations

import os
import shutil
from datetime import datetime
from pathlib import Path

from .errors import BusiError

_claimed: list[Path] = []  # run folders this process began in (new or empty): removed again if its command fails


def cache_dir() -> Path:
    """Where busi keeps what it can make again (ONNX exports of checkpoints, audit results by folder content):
    $BUSI_CACHE, else the user's cache folder. Deleting it is always safe: it is rebuilt on the next use."""
    return Path(os.environ.get("BUSI_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "busi"))


def is_main_process() -> bool:
    """False in the extra processes of a distributed run (Lightning DDP, torchrun, SLURM): they train but never write."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def run_dir(out: str | Path | None, name: str, overwrite: bool = False, resume: bool = False) -> Path:
    """The run folder: --out, or runs/<timestamp>-<name>; a folder already holding files is refused."""
    if not is_main_process():  # rank 0 checks and writes the folder; the others only need its name
        if os.environ.get("BUSI_RUN_DIR"):
            return Path(os.environ["BUSI_RUN_DIR"])
        if out:
            return Path(out)
        raise BusiError("a run started by torchrun or srun needs --out, so that every process agrees on the run folder")
    path = Path(out) if out else Path("runs") / f"{datetime.now():%Y-%m-%dT%H%M%S}-{name}"
    if path.exists() and not path.is_dir():
        raise BusiError(f"{path}: --out exists and is not a folder")
    if path.exists() and any(path.iterdir()) and not (overwrite or resume):
        raise BusiError(f"{path}: already holds a run; pass --overwrite to write over it, or choose another --out")
    if not path.exists() or not any(path.iterdir()):
        _claimed.append(path)
    return path


def discard_unfinished() -> list[Path]:
    """After a command failed: remove the run folders it began, so a rerun is not refused by a half-made one. A folder
    holding a training checkpoint to resume from (*.ckpt) is kept: `--resume` reuses it."""
    removed = []
    for path in _claimed:
        if path.is_dir() and not any(path.rglob("*.ckpt")):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    _claimed.clear()
    return removed


def finished() -> None:
    """The command succeeded: its folders stay."""
    _claimed.clear()
