"""Ceiling of a segment-then-classify pipeline: cross-validate a recipe on lesion crops cut with the TRUE masks.

    python benchmarks/roi_ceiling.py --config configs/recommended.yaml --data ../shared/data/busi_dev --folds 3 \
        --out benchmarks/results/roi-oracle

Every image (training and test) is cropped to a square around its ground-truth lesion mask, widened by
--margin of the lesion's size on each side (at least a quarter of the frame; normal images, whose masks are
empty, stay whole) before the recipe resizes it. Test images never come with masks, so no shippable model
can do this: a predicted mask can only be worse. If even this does not reach a target, cropping to the
lesion cannot be the way to it. The folds are those of `busi cv` with the same seed (the audit runs on the
original images), so the result compares fold by fold with the recipe's own CV.
"""
from __future__ import annotations

import argparse
import functools
import json

import numpy as np
import torch
from PIL import Image

import busi.crossval
from busi.config import make_config
from busi.data import MASK_USABLE, open_image, read_mask


def lesion_box(mask: np.ndarray, margin: float) -> tuple[int, int, int, int]:
    """A square (x0, y0, x1, y1) around the mask's lesions, widened by `margin` per side, kept inside the frame."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return 0, 0, w, h
    cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    side = max(ys.max() - ys.min(), xs.max() - xs.min()) * (1 + 2 * margin)
    side = min(max(side, 0.25 * min(h, w)), min(h, w))
    x0 = int(round(min(max(cx - side / 2, 0), w - side)))
    y0 = int(round(min(max(cy - side / 2, 0), h - side)))
    return x0, y0, x0 + int(side), y0 + int(side)


def with_true_crops(prepare, load_masks, margin: float):
    """Wrap crossval's prepare and load_masks so that images, and the masks Grad-CAM is scored on, are crops."""
    @functools.cache  # images and masks are cut with the same box; read each image's masks once
    def true_box(root, sample) -> tuple[int, int, int, int] | None:
        """None (keep the image whole) when it has no mask that lines up with it."""
        if not sample.mask_paths:
            return None
        with Image.open(root / sample.path) as im:
            w, h = im.size
        mask = read_mask([root / p for p in sample.mask_paths])
        return lesion_box(mask, margin) if mask.shape == (h, w) else None

    def crop_all(dataset, size, read, resample):
        out = []
        for i, s in enumerate(dataset.samples):
            im = read(i, s)
            box = true_box(dataset.root, s) or (0, 0, *im.size)
            out.append(np.array(im.crop(box).resize((size, size), resample)))
        return np.stack(out)

    def cropped_images(cfg, progress=True):
        dataset, report, _, labels, conflicted = prepare(cfg, progress)
        crops = crop_all(dataset, cfg.image_size, lambda i, s: open_image(dataset.file(s)), Image.BILINEAR)
        return dataset, report, torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous(), labels, conflicted

    def cropped_masks(dataset, size):
        _, status = load_masks(dataset, size)

        def read(i, s):
            if status[i] not in MASK_USABLE:  # its status already keeps it out of the localisation scores
                with Image.open(dataset.file(s)) as im:
                    return Image.new("L", im.size)
            return Image.fromarray(read_mask([dataset.file(p) for p in s.mask_paths]).astype(np.uint8) * 255)
        crops = crop_all(dataset, size, read, Image.NEAREST) > 127
        return torch.from_numpy(crops.astype(np.uint8))[:, None], status
    return cropped_images, cropped_masks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--margin", type=float, default=0.5, help="context per side, as a fraction of the lesion's size")
    p.add_argument("--out", default="runs/roi-oracle")
    args = p.parse_args()
    cfg = make_config({"data": args.data, "folds": args.folds, "seed": args.seed}, args.config)
    # an experiment, not a feature: swap the image loading of `busi cv` and leave everything else as it is
    busi.crossval.prepare, busi.crossval.load_masks = with_true_crops(busi.crossval.prepare, busi.crossval.load_masks,
                                                                      args.margin)
    folder = busi.crossval.run_cv(cfg, out=args.out, overwrite=True, progress=False)
    (folder / "roi_oracle.json").write_text(json.dumps({  # benchmarks/accuracy.py marks the row as a ceiling
        "crops": "ground-truth lesion masks, on training and test images", "margin": args.margin}, indent=2))
    print(busi.crossval.format_cv(json.loads((folder / "cv_metrics.json").read_text())))


if __name__ == "__main__":
    main()
