"""DICOM at the speed of PNG? Decoding a folder of N images as PNG and as uncompressed DICOM made from them, and a
cine loop of F frames scored by `busi predict` beside the same frames as single images.

    python benchmarks/dicom_speed.py --data ../shared/data/busi_dev --n 600 --frames 100

Reading: data.load (decode, clean, resize: what train and evaluate do) over each folder, in this process, best of two.
Scoring: `busi predict` (the bundled model, ONNX Runtime) in a fresh process each, on the loop and on its frames as
single-frame DICOMs; images/s counts frames. Prints one JSON line per measurement.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    from busi.data import load, scan
    from conftest import write_dicom  # the tests' scanner-like DICOM writer
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--parts", nargs="+", choices=("read", "cine"), default=["read", "cine"])
    args = ap.parse_args()
    pngs = sorted(p for p in args.data.rglob("*.png") if "_mask" not in p.name)[:args.n]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for kind in ("png", "dicom") if "read" in args.parts else ():
            for p in pngs:
                target = tmp / kind / p.parent.name / p.name
                target.parent.mkdir(parents=True, exist_ok=True)
                if kind == "png":
                    target.symlink_to(p.resolve())
                else:
                    write_dicom(target.with_suffix(".dcm"), np.asarray(Image.open(p).convert("RGB")), "MONOCHROME2")
        steps = ("crop", "overlays")
        for kind in ("png", "dicom") if "read" in args.parts else ():
            times = []
            for _ in range(2):
                start = time.perf_counter()
                load(scan(tmp / kind), 224, False, steps)
                times.append(time.perf_counter() - start)
            print(json.dumps({"read": kind, "images": len(pngs), "seconds": round(min(times), 2),
                              "images_per_second": round(len(pngs) / min(times), 1)}), flush=True)
        frames = [np.asarray(Image.open(p).convert("L").resize((560, 420))) for p in pngs[:args.frames]]
        rgb = np.repeat(np.stack(frames)[..., None], 3, axis=3)
        write_dicom(tmp / "loop.dcm", rgb, "MONOCHROME2")
        (tmp / "single").mkdir()
        for n, frame in enumerate(rgb):
            write_dicom(tmp / "single" / f"{n:03d}.dcm", frame, "MONOCHROME2")
        scored = (("cine loop", tmp / "loop.dcm"), ("single-frame files", tmp / "single"))
        for what, target in scored if "cine" in args.parts else ():
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "busi.cli", "predict", str(target), "--json", "--no-progress",
                            "--engine", "onnx"], check=True, capture_output=True)
            seconds = time.perf_counter() - start
            print(json.dumps({"predict": what, "frames": len(rgb), "seconds": round(seconds, 1),
                              "frames_per_second": round(len(rgb) / seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
