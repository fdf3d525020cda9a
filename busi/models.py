"""Architectures by name, ImageNet weight loading (download or local file) and head replacement."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torchvision
from torch import nn

from .errors import BusiError


class CustomCNN(nn.Module):
    """The seed's design: blocks of convolution, ELU and max-pooling, then a fully connected head.

    Average pooling before the head keeps it small (the seed flattened a 224x224 map into millions of
    weights) and lets any image size through.
    """

    def __init__(self, num_classes: int = 3, widths=(32, 64, 128, 256), hidden: int = 256, dropout: float = 0.3):
        super().__init__()
        blocks, c_in = [], 3
        for c in widths:
            blocks += [nn.Conv2d(c_in, c, 3, padding=1), nn.ELU(inplace=True), nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c_in * 16, hidden), nn.ELU(inplace=True),
                                  nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.head(self.pool(self.features(x)))


class Ensemble(nn.Module):
    """Several trained models as one: the output is the log of their mean probability, so softmax gives that mean."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x):
        log_probs = torch.stack([m(x).float().log_softmax(1) for m in self.members])
        return torch.logsumexp(log_probs, 0) - math.log(len(self.members))


def _resnet(depth: int):
    def build(num_classes: int) -> nn.Module:
        model = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        model.fc = nn.Linear(model.fc.in_features, num_classes)
        return model
    return build


ARCHITECTURES = {
    "custom-cnn": lambda num_classes: CustomCNN(num_classes),
    "resnet18": _resnet(18),
    "resnet50": _resnet(50),
}
# torchvision's weights enums, for the models that have ImageNet weights
IMAGENET_WEIGHTS = {
    "resnet18": "ResNet18_Weights",
    "resnet50": "ResNet50_Weights",
}


def build(arch: str, num_classes: int, pretrained: bool = False, weights: str | Path | None = None,
          members: int = 1) -> nn.Module:
    """A fresh model; with pretrained (or a weights file) its backbone starts from ImageNet; members > 1: an Ensemble."""
    if arch not in ARCHITECTURES:
        raise BusiError(f"unknown model '{arch}' (choose from {', '.join(ARCHITECTURES)})")
    if members > 1:
        return Ensemble([build(arch, num_classes, pretrained, weights) for _ in range(members)])
    model = ARCHITECTURES[arch](num_classes)
    if weights is not None or (pretrained and arch in IMAGENET_WEIGHTS):
        load_imagenet(model, arch, weights)
    return model


def _download_imagenet(arch: str) -> dict:
    enum = getattr(torchvision.models, IMAGENET_WEIGHTS[arch]).DEFAULT
    try:
        return enum.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # urllib, ssl, socket and hash errors all mean the same to the user
        raise BusiError(
            f"{arch}: could not download ImageNet weights ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no network?'}); "
            f"pass --weights FILE with a local ImageNet state dict, or --no-pretrained to train from scratch") from None


def load_imagenet(model: nn.Module, arch: str, weights: str | Path | None = None) -> None:
    """Load ImageNet weights into every layer but the classification head (which stays new)."""
    if arch not in IMAGENET_WEIGHTS:
        raise BusiError(f"{arch}: has no ImageNet weights; drop --weights or choose {', '.join(IMAGENET_WEIGHTS)}")
    if weights is None:
        state = _download_imagenet(arch)
    else:
        state = read_state_dict(weights)
    head = "fc."
    state = {k: v for k, v in state.items() if not k.startswith(head)}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(head)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    source = weights or f"torchvision {arch} ImageNet weights"
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise BusiError(f"{source}: not a {arch} state dict ({len(missing)} missing and {len(unexpected)} unexpected keys, e.g. '{example}')")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise BusiError(f"{source}: '{k}' has shape {tuple(v.shape)}, {arch} needs {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)


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


def last_conv_block(model: nn.Module) -> tuple[nn.Module, int]:
    """The module whose output is the last spatial feature map (for Grad-CAM and the lesion head), and its channels."""
    if isinstance(model, CustomCNN):
        return model.features, [m for m in model.features if isinstance(m, nn.Conv2d)][-1].out_channels
    if isinstance(model, torchvision.models.ResNet):
        return model.layer4, model.fc.in_features
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise BusiError(f"{type(model).__name__} has no convolutional layer to explain or supervise")
    return convs[-1], convs[-1].out_channels


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
