"""A folder at the speed of the network? `busi predict` and `busi evaluate` on 100, 683 and 2,000 labelled images,
beside the bare network passes, in images per second and peak memory.

    python benchmarks/folder_speed.py --data ../shared/data/busi_dev --data ../shared/data/busbra_dev \
        --sizes 100 683 2000 --torch-at 683 --out runs/folder-speed

A labelled folder of each size is made of links to the given folders' images and masks, classes and sources mixed
(2,000 needs more images than busi_dev + busbra_dev hold: the rest are the same files under other names, so evaluate's
near-duplicate check finds them, as it would a hospital's repeats). Each command runs in a fresh process with the
bundled model, its ONNX export already cached (the first run of a checkpoint exports it: about a minute, once), and
`--engine torch` at --torch-at sizes; wall seconds and peak resident memory come from /usr/bin/time. Bare network:
the same network passes (both engines, mirrored pass included) over preloaded images, in this process. --stages N:
where each image's time goes (decode, clean, resize, network, after the network), in ms per image, both engines.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODEL = ROOT / "busi" / "assets" / "recommended.pth"


def labelled_folder(sources: list[Path], n: int, root: Path) -> Path:
    """root/<class>/ with n images (and their masks) linked from sources, in turn from each source."""
    pools = []
    for source in sources:  # classes mixed: every size holds each class in about its share of the source
        pool = sorted(p for p in source.rglob("*.png") if "_mask" not in p.name)
        random.Random(0).shuffle(pool)
        pools.append(pool)
    order = [p for group in zip(*[pool * (1 + n // max(1, len(pool))) for pool in pools]) for p in group]
    seen: dict[Path, int] = {}
    for image in order[:n]:
        copy = seen[image] = seen.get(image, -1) + 1  # 0 the first time an image is linked, then 1, 2 …
        folder = root / image.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        stem = image.stem if copy == 0 else f"{image.stem} copy{copy}"
        os.symlink(image.resolve(), folder / f"{stem}.png")
        for mask in image.parent.glob(f"{image.stem}_mask*.png"):
            os.symlink(mask.resolve(), folder / f"{stem}{mask.stem[len(image.stem):]}.png")
    return root


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak resident GiB) of cmd in a fresh process."""
    done = subprocess.run(["/usr/bin/time", "-f", "%e %M", *cmd], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr[-800:]}")
    seconds, kb = done.stderr.strip().splitlines()[-1].split()
    return float(seconds), int(kb) / 2 ** 20


def bare(n: int, folder: Path) -> dict:
    """Images per second of the network passes alone, both engines, on n preloaded images of folder."""
    import torch
    from busi.engine import OnnxEngine
    from busi.inference import LoadedModel, image_files, outputs_of
    loaded = LoadedModel(MODEL)
    images = torch.cat([loaded.prepare(p).input for p in image_files([folder])[:n]])
    config = loaded.config
    engine = OnnxEngine(MODEL, loaded.model, config)
    out = {}
    for name, run in (("torch", lambda: outputs_of(loaded.model, images, config["mean"], config["std"], tta=True)),
                      ("onnx", lambda: engine.run(images))):
        start = time.perf_counter()
        run()
        out[name] = round(n / (time.perf_counter() - start), 1)
    return out


def stages(n: int, folder: Path, engine: str) -> dict:
    """Where one image's time goes in predict, in milliseconds per image over n images of folder (in this process, the
    export cached): decoding the file, cleaning it (crop to the scan, paint out overlays), resizing to the model's
    input, the network (both passes, batches of 32) and everything after it (decision, outline, shift check, row)."""
    import torch
    from busi import preprocess
    from busi.inference import LoadedModel, Prepared, image_files, model_input, read_image
    loaded = LoadedModel(MODEL)
    loaded.use_engine(engine, n)
    files = image_files([folder])[:n]
    spent = dict.fromkeys(("decode", "clean", "resize", "network", "after the network"), 0.0)
    prepared = []
    for f in files:
        start = time.perf_counter()
        image = read_image(f)
        decoded = time.perf_counter()
        origin: list = []
        cleaned = preprocess.apply(image, loaded.config.get("preprocess", ()), origin=origin)
        clean = time.perf_counter()
        prepared.append(Prepared(str(f), cleaned, origin, model_input(cleaned, loaded.config["image_size"]), None, None))
        spent["decode"] += decoded - start
        spent["clean"] += clean - decoded
        spent["resize"] += time.perf_counter() - clean
    for i in range(0, len(prepared), 32):
        batch = prepared[i:i + 32]
        start = time.perf_counter()
        loaded.run(torch.cat([p.input for p in batch]))
        network = time.perf_counter()
        loaded.describe(batch)  # the network again, then the rest: the rest is the difference
        spent["network"] += network - start
        spent["after the network"] += (time.perf_counter() - network) - (network - start)
    return {"engine": engine, "images": len(files), "ms_per_image": {k: round(1000 * v / len(files), 1)
                                                                    for k, v in spent.items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", type=Path, required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 683, 2000])
    ap.add_argument("--torch-at", type=int, nargs="*", default=[683])
    ap.add_argument("--bare-images", type=int, default=256)
    ap.add_argument("--stages", type=int, default=0, help="also time each stage of predict on this many images")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    busi = str(Path(sys.executable).parent / "busi")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        first = labelled_folder(args.data, 1, Path(tmp) / "one")
        timed([busi, "predict", str(first), "--engine", "onnx"])  # the export, once: every later run finds it cached
        for n in args.sizes:
            folder = labelled_folder(args.data, n, Path(tmp) / f"n{n}")
            for engine in ["auto"] + (["torch"] if n in args.torch_at else []):
                for command in ("predict", "evaluate"):
                    cmd = ([busi, "predict", str(folder), "--json"] if command == "predict"
                           else [busi, "evaluate", "--data", str(folder), "--out", str(Path(tmp) / f"eval-{n}-{engine}")])
                    seconds, gib = timed([*cmd, "--no-progress", "--engine", engine])
                    rows.append({"images": n, "command": command, "engine": engine, "seconds": round(seconds, 1),
                                 "images_per_second": round(n / seconds, 1), "peak_gib": round(gib, 2)})
                    print(json.dumps(rows[-1]), flush=True)
        network = bare(args.bare_images, Path(tmp) / f"n{max(args.sizes)}")
        per_stage = [stages(args.stages, Path(tmp) / f"n{max(args.sizes)}", engine) for engine in ("onnx", "torch")
                     if args.stages]
        for row in per_stage:
            print(json.dumps(row), flush=True)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} threads, {platform.processor() or ''}".strip(", "),
              "rows": rows, "bare_network_images_per_second": network, "bare_images": args.bare_images,
              "stages": per_stage}
    (args.out / "folder_speed.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result["bare_network_images_per_second"]))


if __name__ == "__main__":
    main()
