"""Architectures by name, each with its input normalisation; ImageNet weights (busi.weights) and head replacement."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torchvision
from torch import nn

from .data import IMAGENET_MEAN, IMAGENET_STD
from .errors import BusiError
from .weights import SOURCES as IMAGENET_WEIGHTS, load_imagenet


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


def _efficientnet_lite(variant: int):
    def build(num_classes: int) -> nn.Module:
        import timm  # TF-"same" padding, BN eps 1e-3 and ReLU6, as the converted ImageNet weights expect
        model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False, num_classes=num_classes)
        # timm's Google-style init draws the head from U(±1/sqrt(classes)): for 3 classes, logits of std ~3 and a
        # first loss of 2-4 whose gradients wreck the pretrained body. PyTorch's default (fan-in) init, as the
        # ResNets' new heads get, starts near uniform probabilities.
        model.classifier.reset_parameters()
        return model
    return build


ARCHITECTURES = {
    "custom-cnn": lambda num_classes: CustomCNN(num_classes),
    "resnet18": _resnet(18),
    "resnet50": _resnet(50),
    "efficientnet-lite0": _efficientnet_lite(0),
    "efficientnet-lite2": _efficientnet_lite(2),
}
# The TF EfficientNet-Lite weights were trained on images scaled to [-1, 1]; the others use torchvision's statistics.
NORMALIZATION = {"efficientnet-lite0": ((0.5,) * 3, (0.5,) * 3), "efficientnet-lite2": ((0.5,) * 3, (0.5,) * 3)}


def normalization(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the model's input, per channel, for images scaled to [0, 1]."""
    return NORMALIZATION.get(arch, (IMAGENET_MEAN, IMAGENET_STD))


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


def last_conv_block(model: nn.Module) -> tuple[nn.Module, int]:
    """The module whose output is the last spatial feature map (for Grad-CAM and the lesion head), and its channels."""
    if isinstance(model, CustomCNN):
        return model.features, [m for m in model.features if isinstance(m, nn.Conv2d)][-1].out_channels
    if isinstance(model, torchvision.models.ResNet):
        return model.layer4, model.fc.in_features
    if hasattr(model, "conv_head") and hasattr(model, "bn2"):  # timm EfficientNet: head conv, then BN + activation
        return model.bn2, model.num_features
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise BusiError(f"{type(model).__name__} has no convolutional layer to explain or supervise")
    return convs[-1], convs[-1].out_channels


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
