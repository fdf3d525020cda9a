"""Is an image like those the model trained on? Nearest-neighbour distance in the model's own feature space."""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .data import normalize
from .errors import BusiError

K = 10  # the k-th nearest training image: one close copy does not make an image familiar
DIMS = 128  # principal directions kept of the features (the rest is measured as one residual distance)
QUANTILE = 0.95  # the threshold: this share of held-out images of the training sources lies within it
MIN_HELDOUT = 20  # fewer held-out images than this cannot place a 95% threshold
TOO_FEW_TO_SAY = 20  # fewer images than this: a share of flagged ones says nothing about the folder as a whole
FOLDER_P = 0.001  # a folder is 'outside' when this many flagged images would be that unlikely at the 5% rate …
FOLDER_FACTOR = 3  # … and at least three times that rate: held-out folds of the training sources, measured in
# cross-validation, ran at 5.6% and 9.6%, above the 5% the validation part sets (benchmarks/hospitals.md)
KEYS = ("shift.center", "shift.components", "shift.bank")


def _last_layer(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """(network, its classifier's last layer); an ensemble's first member speaks for it."""
    net = model.members[0] if hasattr(model, "members") else model
    return net, [m for m in net.modules() if isinstance(m, nn.Linear)][-1]


@contextmanager
def capturing(model: nn.Module):
    """Yields a list that collects, per forward pass of model, what its classifier's last layer reads (pooled
    features, float32 on the CPU)."""
    _, head = _last_layer(model)
    seen = []
    hook = head.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].float().cpu()))
    try:
        yield seen
    finally:
        hook.remove()


@torch.no_grad()
def features(model: nn.Module, images: torch.Tensor, mean, std, batch_size: int = 64) -> torch.Tensor:
    """What the classifier's last layer reads (pooled features), per uint8 NCHW image, as float32 rows."""
    net, head = _last_layer(model)
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    try:
        with capturing(net) as seen:
            for i in range(0, len(images), batch_size):
                net(normalize(images[i:i + batch_size].to(device), mean, std))
    finally:
        net.train(was_training)
    return torch.cat(seen) if seen else torch.zeros(0, head.in_features)


def _project(tensors: dict, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = F.normalize(feats.float(), dim=1) - tensors["shift.center"].float()
    p = z @ tensors["shift.components"].float()
    residual = (z - p @ tensors["shift.components"].float().T).norm(dim=1)
    return p, residual


def distances(tensors: dict, config: dict, feats: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
    """Each row's distance to its k-th nearest training image (unit-length features, principal subspace plus the
    residual off it)."""
    p, residual = _project(tensors, feats)
    bank = tensors["shift.bank"].float()
    k = min(config["k"] + int(exclude_self), len(bank))
    near = torch.cdist(p, bank).topk(k, largest=False).values[:, -1]
    return (near ** 2 + residual ** 2).sqrt()


def summarize(train_feats: torch.Tensor, heldout_feats: torch.Tensor) -> tuple[dict, dict]:
    """(tensors for the checkpoint, config entry): the training images' features and the distance within which
    QUANTILE of the held-out images (of the same sources, never trained on) lie."""
    if len(heldout_feats) < MIN_HELDOUT:
        raise BusiError(f"the shift summary needs at least {MIN_HELDOUT} held-out images to set its threshold (got "
                        f"{len(heldout_feats)}): keep a validation part (val_size)")
    z = F.normalize(train_feats.float(), dim=1)
    center = z.mean(0)
    dims = min(DIMS, len(z) - 1, z.shape[1])
    _, _, v = torch.linalg.svd(z - center, full_matrices=False)
    components = v[:dims].T.contiguous()
    tensors = {"shift.center": center, "shift.components": components, "shift.bank": (z - center) @ components}
    config = {"k": K, "dims": dims, "quantile": QUANTILE, "n_reference": len(z), "n_heldout": len(heldout_feats)}
    config["threshold"] = round(float(distances(tensors, config, heldout_feats).quantile(QUANTILE)), 6)
    tensors = {k: v.half() if k == "shift.bank" else v for k, v in tensors.items()}  # the bank is most of the bytes
    return tensors, config


def verdict(flags: torch.Tensor, rate: float = 1 - QUANTILE) -> dict:
    """A folder's flagged images against the rate held-out images of the training sources showed: 'outside' when
    that many would be very unlikely (binomial tail below FOLDER_P) and they are FOLDER_FACTOR times the rate or more
    (a large folder of images like the training ones can beat the 5% slightly, and is no different for it)."""
    from scipy.stats import binom
    n, k = int(len(flags)), int(flags.sum())
    p = float(binom.sf(k - 1, n, rate)) if n else 1.0
    return {"n": n, "flagged": k, "share": round(k / n, 4) if n else None, "expected_share": rate,
            "p_value": p, "outside": bool(n and p < FOLDER_P and k / n >= FOLDER_FACTOR * rate),
            "too_few": n < TOO_FEW_TO_SAY}


def describe(v: dict, what: str = "these images") -> str:
    """One line for the terminal and the report."""
    if v["outside"]:
        return (f"{v['flagged']} of {v['n']} of {what} ({v['share']:.0%}) lie outside what the model was trained on "
                f"(≤ {v['expected_share']:.0%} of images like its training images do): expect its figures to be worse "
                "here than where it was validated; re-set its threshold (busi calibrate) or adapt it (busi adapt)")
    if v.get("too_few"):  # too few to call the folder like the training images (it can still be clearly unlike)
        return (f"{v['flagged']} of {v['n']} of {what} flagged as unlike the model's training images: too few images "
                f"(fewer than {TOO_FEW_TO_SAY}) to say whether the folder as a whole lies outside what it trained on")
    return (f"{what} look like the model's training images ({v['flagged']} of {v['n']} flagged, "
            f"{v['expected_share']:.0%} expected)")
