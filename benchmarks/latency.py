"""How long `busi predict` makes a user wait, beside the least any PyTorch program could (the bare minimum).

    python benchmarks/latency.py --images ../shared/data/busi_dev --repeats 5 --md benchmarks/latency.md

Each figure is the median of --repeats fresh processes (cold start: Python, imports, model load, prediction):
- bare minimum: import torch, timm and the U-Net decoder, build the classifier and the lesion segmenter, load the
  bundled weights, read one image, one forward pass of each;
- `busi predict IMAGE` with the bundled model (its mirror test-time augmentation and shift check included);
- an argument or path mistake: `busi predict nope/`, `busi audit nope/`, `busi evaluate --data nope/`;
- 100 images: `busi predict FOLDER` against a plain torch loop over the same files (one image per forward pass).
Run it with nothing else busy on the machine.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "busi" / "assets" / "recommended.pth"

BARE = """
import sys, torch, timm, numpy as np
from torch import nn
from PIL import Image
from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder
state = torch.load(sys.argv[1], map_location="cpu", weights_only=True)["state_dict"]
state = {k: v.float() for k, v in state.items()}
classifier = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3)
segmenter = None
if any(k.startswith("segmenter.") for k in state):  # the bundled model: a classifier and a lesion segmenter
    class Segmenter(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = timm.create_model("tf_efficientnet_lite0", features_only=True, pretrained=False)
            self.decoder = UnetDecoder([3] + self.encoder.feature_info.channels(), [64, 48, 32, 16], n_blocks=4)
            self.head = nn.Conv2d(16, 1, 3, padding=1)

        def forward(self, x):
            return self.head(self.decoder([x] + self.encoder(x)))
    segmenter = Segmenter()
    segmenter.load_state_dict({k[10:]: v for k, v in state.items() if k.startswith("segmenter.")})
    state = {k[11:]: v for k, v in state.items() if k.startswith("classifier.")}
classifier.load_state_dict(state)
torch.set_grad_enabled(False)
for path in sys.argv[2:]:
    im = np.asarray(Image.open(path).convert("RGB").resize((224, 224), Image.BILINEAR))
    x = (torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
    p = torch.softmax(classifier.eval()(x), 1)
    if segmenter is not None:
        lesion = torch.sigmoid(segmenter.eval()(torch.nn.functional.interpolate(x, size=(160, 160), mode="bilinear")))
    print(path, p.tolist())
"""


def timed(cmd: list[str], repeats: int, ok=(0,)) -> float:
    """Median wall seconds of running cmd in a fresh process."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        times.append(time.perf_counter() - start)
        if done.returncode not in ok:
            raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-500:]}")
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True, help="a folder of ultrasound images (BUSI's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--md", type=Path)
    args = parser.parse_args()
    files = sorted(p for p in args.images.rglob("*.png") if "_mask" not in p.name)[:100]
    one = str(files[0])
    busi = [sys.executable, "-m", "busi.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        bare = Path(tmp) / "bare.py"
        bare.write_text(BARE)
        hundred = Path(tmp) / "hundred"
        hundred.mkdir()
        for f in files:
            (hundred / f"{f.parent.name}-{f.name}").symlink_to(f.resolve())
        timed([sys.executable, str(bare), str(MODEL), one], 1)  # warm the file cache for everyone alike
        rows = {
            "bare minimum: torch + timm + U-Net, build both networks, load weights, 1 image": timed([sys.executable, str(bare), str(MODEL), one],
                                                                              args.repeats),
            "busi predict IMAGE (bundled model)": timed([*busi, "predict", one], args.repeats),
            "busi predict nope/ (a path that does not exist)": timed([*busi, "predict", "nope/"], args.repeats, ok=(2,)),
            "busi audit nope/": timed([*busi, "audit", "nope/"], args.repeats, ok=(2,)),
            "busi evaluate --data nope/": timed([*busi, "evaluate", "--data", "nope/"], args.repeats, ok=(2,)),
            "busi train --data nope/": timed([*busi, "train", "--data", "nope/"], args.repeats, ok=(2,)),
            f"plain torch loop, {len(files)} images (one forward pass each)":
                timed([sys.executable, str(bare), str(MODEL), *map(str, sorted(hundred.iterdir()))], args.repeats),
            f"busi predict FOLDER of {len(files)} images (batches of 32)": timed([*busi, "predict", str(hundred)],
                                                                                 args.repeats),
        }
    base = rows["bare minimum: torch + timm + U-Net, build both networks, load weights, 1 image"]
    import torch
    lines = [f"# Prediction latency ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
             f"{torch.backends.cpu.get_cpu_capability()}; torch {torch.__version__}. Command: `python benchmarks/latency.py "
             f"{' '.join(sys.argv[1:])}`. Wall seconds, median of {args.repeats} fresh processes each (imports and model "
             "load included: what a user waits for).", "",
             "| what | seconds | × bare minimum |", "|---|---|---|"]
    lines += [f"| {name} | {s:.2f} | {s / base:.2f} |" for name, s in rows.items()]
    lines += ["", "`busi predict` runs the model twice per image (itself and its mirror image: the recipe's test-time "
              "augmentation; the shift check reads the same passes), in batches, and first cuts each image to the scan "
              "and paints out calipers and text (about a quarter of a folder's time, measured with cProfile); the bare "
              "minimum runs the model once on the raw image. Mistakes are answered before torch is imported."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        args.md.write_text(text)
        args.md.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
