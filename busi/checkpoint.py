"""Saving and loading our checkpoints: tensors plus a plain JSON-able config, read with weights_only=True."""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .config import MODEL_NAMES
from .errors import BusiError

if TYPE_CHECKING:  # torch is imported where it is used, so that peek() answers before it loads
    import torch
    from torch import nn

FORMAT = "busi-checkpoint"
REQUIRED = ("arch", "classes", "image_size", "mean", "std")


def save(path: str | Path, model: nn.Module, config: dict, dtype: torch.dtype | None = None,
         extras: dict[str, torch.Tensor] | None = None, only: str = "") -> None:
    """Write atomically, so an interrupted save never leaves a half file under the real name.

    dtype (e.g. float16) stores the model's floating-point tensors smaller (only those whose name starts with `only`,
    e.g. "segmenter."); load() casts them back to the model's dtype.
    extras: tensors that describe the model's training data rather than its weights (busi.shift's summary, busi.audit's
    fingerprints), kept as they are.
    """
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise ValueError(f"checkpoint config lacks {missing}")
    import torch
    json.dumps(config)  # plain types only: anything else would need unpickling to read back
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() and k.startswith(only) else v for k, v in state.items()}
    torch.save({"format": FORMAT, "version": __version__, "state_dict": state,
                "config": {"temperature": 1.0, **config},
                "extras": {k: v.detach().cpu().contiguous() for k, v in (extras or {}).items()}}, tmp)
    os.replace(tmp, path)


def peek(path: str | Path) -> None:
    """A quick look without torch: a file that is no PyTorch archive, or one with no busi checkpoint inside, is a
    one-line error at once; read() still validates everything else."""
    path = Path(path)
    if not path.exists():
        raise BusiError(f"{path}: checkpoint does not exist")
    if path.is_dir():
        raise BusiError(f"{path}: is a folder; pass the checkpoint.pth inside it")
    if not zipfile.is_zipfile(path):
        raise BusiError(f"{path}: not a readable checkpoint (truncated, corrupt or not a PyTorch file)")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if not pickles or FORMAT.encode() not in archive.read(pickles[0]):
            raise BusiError(f"{path}: not a busi checkpoint (expected a checkpoint.pth written by `busi train`)")


def read(path: str | Path) -> dict:
    """The checkpoint's config, validated, without building the model."""
    path = Path(path)
    if not path.exists():
        raise BusiError(f"{path}: checkpoint does not exist")
    if path.is_dir():
        raise BusiError(f"{path}: is a folder; pass the checkpoint.pth inside it")
    import torch
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # tensors read when used
    except Exception as e:
        raise BusiError(f"{path}: not a readable checkpoint (truncated, corrupt or not a PyTorch file: {type(e).__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise BusiError(f"{path}: not a busi checkpoint (expected a checkpoint.pth written by `busi train`)")
    config = obj.get("config")
    if not isinstance(config, dict) or any(k not in config for k in REQUIRED) or not isinstance(obj.get("state_dict"), dict):
        raise BusiError(f"{path}: busi checkpoint is incomplete (config or weights missing)")
    if config["arch"] not in MODEL_NAMES:
        raise BusiError(f"{path}: architecture '{config['arch']}' is unknown to this version of busi")
    return obj


def load(path: str | Path, extras: bool = False):
    """(model in eval mode, config), and with extras=True the extra tensors too: (model, config, extras)."""
    import torch
    from .models import build
    obj = read(path)
    config = obj["config"]
    model = build(config["arch"], len(config["classes"]), members=int(config.get("members", 1)),
                  lesion_size=int(config.get("lesion_size", 0)))
    try:
        model.load_state_dict(obj["state_dict"])
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        what = f"{config['arch']} with {len(config['classes'])} classes"
        if int(config.get("members", 1)) > 1:
            what = f"ensemble of {config['members']} x {what}"
        raise BusiError(f"{path}: weights do not fit a {what} ({first})") from None
    if extras:
        found = obj.get("extras") or {}
        if not isinstance(found, dict) or not all(isinstance(v, torch.Tensor) for v in found.values()):
            raise BusiError(f"{path}: busi checkpoint is damaged (its extra tensors are not tensors)")
        return model.eval(), config, found
    return model.eval(), config


def check_classes(path: str | Path, config: dict, classes: tuple[str, ...] | list[str]) -> list[str]:
    """The model's classes absent from the data; the data may hold a subset of them (BUS-BRA has no 'normal')."""
    known = list(config["classes"])
    unknown = [c for c in classes if c not in known]
    if len(unknown) == len(classes):
        raise BusiError(f"{path}: trained for classes {', '.join(known)}, but the data has {', '.join(classes)}")
    if unknown:
        raise BusiError(f"{path}: the data's class folder(s) {', '.join(unknown)} are not among the model's classes "
                        f"({', '.join(known)}); leave them out or pass a folder without them")
    return [c for c in known if c not in classes]
