"""Small generated datasets in the Kaggle layout, and a few real BUSI images when ../shared is beside the repo."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

BUSI_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "busi_dev"
CLASSES = ("benign", "malignant", "normal")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Every test gets its own audit cache, so no test passes because another filled it."""
    monkeypatch.setenv("BUSI_CACHE", str(tmp_path / "cache"))


def synthetic_scan(label: int, seed: int, size: int = 96) -> Image.Image:
    """A speckled grey 'scan': benign a bright round blob, malignant a dark jagged one, normal none."""
    rng = np.random.default_rng(seed)
    base = rng.normal(90, 25, (size, size)).clip(0, 255).astype(np.uint8)
    im = Image.fromarray(base).convert("RGB")
    draw = ImageDraw.Draw(im)
    cx, cy, r = rng.integers(30, size - 30), rng.integers(30, size - 30), rng.integers(10, 18)
    if label == 0:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(200, 200, 200))
    elif label == 1:
        pts = [(cx + r * np.cos(a) * rng.uniform(0.5, 1.4), cy + r * np.sin(a) * rng.uniform(0.5, 1.4))
               for a in np.linspace(0, 2 * np.pi, 12, endpoint=False)]
        draw.polygon(pts, fill=(20, 20, 20))
    return im


def make_kaggle_folder(root: Path, per_class: int = 8, size: int = 96) -> Path:
    """Dataset_BUSI_with_GT layout: '<class> (i).png' with '<class> (i)_mask.png' beside it."""
    for label, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(1, per_class + 1):
            synthetic_scan(label, seed=1000 * label + i, size=size).save(folder / f"{name} ({i}).png")
            mask = Image.new("1", (size, size), 0)
            if name != "normal":
                ImageDraw.Draw(mask).ellipse([30, 30, 60, 60], fill=1)
            mask.save(folder / f"{name} ({i})_mask.png")
    return root


@pytest.fixture
def kaggle_folder(tmp_path) -> Path:
    return make_kaggle_folder(tmp_path / "Dataset_BUSI_with_GT")


def copy_busi(dst: Path, names: dict[str, list[str]]) -> Path:
    """Copy named images (and their masks) of busi_dev into dst, in the same layout."""
    if not BUSI_DEV.is_dir():
        pytest.skip(f"{BUSI_DEV} is not here")
    for cls, files in names.items():
        (dst / cls).mkdir(parents=True, exist_ok=True)
        for f in files:
            stem = Path(f).stem
            for src in (BUSI_DEV / cls).glob(f"{glob_escape(stem)}*.png"):
                if src.stem == stem or src.stem.startswith(stem + "_mask"):
                    shutil.copy(src, dst / cls / src.name)
    return dst


def glob_escape(s: str) -> str:
    return s.replace("[", "[[]").replace("(", "[(]").replace(")", "[)]")


@pytest.fixture
def busi_few(tmp_path) -> Path:
    """Six real BUSI images per class."""
    names = {c: [f"{c} ({i}).png" for i in range(1, 7)] for c in CLASSES}
    return copy_busi(tmp_path / "busi_few", names)
