"""Training speed of our pipeline against a plain reference pipeline, matmul peak, and eager vs ONNX latency.

    python benchmarks/speed.py --data ../shared/data/busi_dev [--accelerator cpu|gpu] [--json speed.json] [--md benchmarks/speed.md]
    python benchmarks/speed.py --data ../shared/data/busi_dev --accelerator gpu --seed-experiment --md speed-gpu.md   # on a GPU

"ours": `busi train`'s path: images decoded once into memory (uint8, on the training device), augmentation on
whole batches there, the machine-chosen precision and memory layout (busi.hardware: bf16 only where it is
native), through Lightning's Trainer and busi's Classifier.
"reference": the original description's way: torchvision ImageFolder decoding PNGs every epoch, per-image
CPU transforms, a DataLoader, and a hand-written loop at the same precision.
Both train the same architecture with Adam and cross-entropy on batches of 32; we time steps after warm-up.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

from busi import hardware
from busi.config import make_config
from busi.data import load, scan
from busi.models import build
from busi.train import Classifier, device_tensors, train_loader

MODELS = {"custom-cnn": 224, "resnet50": 224, "resnet18": 176, "efficientnet-lite0": 224}  # the seed's, scratch.yaml's, recommended.yaml's
BATCH = 32


def matmul_peak(device: str, dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e9


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def train_flops_per_image(arch: str, size: int) -> float:
    """Forward FLOPs x 3 (forward + backward), counted by PyTorch."""
    model = build(arch, 3)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, size, size))
    return 3.0 * counter.get_total_flops()


def _autocast(device: str, precision: str):
    return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision.startswith("bf16"))


def reference_rate(data: Path, arch: str, size: int, steps: int, device: str, precision: str) -> float:
    tf = transforms.Compose([transforms.Resize((size, size)), transforms.RandomHorizontalFlip(), transforms.RandomRotation(10),
                             transforms.RandomAutocontrast(), transforms.ToTensor(),
                             transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    dataset = torchvision.datasets.ImageFolder(str(data), transform=tf, is_valid_file=lambda p: "_mask" not in p)
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=0, drop_last=True)
    model = build(arch, 3).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    seen, start = 0, None
    for step, (x, y) in enumerate(_cycle(loader)):
        if step == 2:  # warm-up done
            _sync(device)
            start, seen = time.perf_counter(), 0
        if step == steps + 2:
            break
        x, y = x.to(device), y.to(device)
        with _autocast(device, precision):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(y)
    _sync(device)
    return seen / (time.perf_counter() - start)


def _cycle(loader):
    while True:
        yield from loader


class _StepTimer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.seen = warmup, None, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            _sync(module.device.type)
            self.start, self.seen = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.start is not None:
            self.seen += len(batch[1])


def ours_rate(images: torch.Tensor, labels: torch.Tensor, arch: str, steps: int, cfg) -> float:
    """busi's own training path: Lightning Trainer + busi.train.Classifier on in-memory uint8 tensors."""
    precision, device = cfg.precision, hardware.device_type(cfg.accelerator)
    model = build(arch, 3)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    timer = _StepTimer(warmup=2)
    trainer = L.Trainer(max_steps=steps + 2, accelerator=cfg.accelerator, devices=1, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    tensors = device_tensors((images, labels), trainer)
    trainer.fit(Classifier(model, cfg), train_loader(tensors, BATCH, True))
    _sync(device)
    return timer.seen / (time.perf_counter() - timer.start)


def ceiling_rate(arch: str, size: int, steps: int, cfg) -> float:
    """The same training step on random tensors already on the device: what the model alone can do."""
    device = hardware.device_type(cfg.accelerator)
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = build(arch, 3).to(device).to(memory_format=layout).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(BATCH, 3, size, size, device=device).contiguous(memory_format=layout)
    y = torch.randint(0, 3, (BATCH,), device=device)
    for step in range(steps + 2):
        if step == 2:
            _sync(device)
            start = time.perf_counter()
        with _autocast(device, cfg.precision):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _sync(device)
    return steps * BATCH / (time.perf_counter() - start)


def seed_experiment_seconds(data: str, accelerator: str) -> float:
    """Wall time of the whole seed experiment (both models, 25 epochs, 224 px, 70/30) at the machine-chosen precision."""
    import subprocess
    import sys
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        config = Path(__file__).resolve().parents[1] / "configs" / "seed.yaml"
        subprocess.run([sys.executable, "-m", "busi.cli", "train", "--config", str(config), "--data", data,
                        "--no-pretrained", "--accelerator", accelerator,
                        "--out", f"{tmp}/run", "--no-progress"], check=True)
        return time.perf_counter() - start


def latency(arch: str, size: int, tmp: Path) -> dict:
    """Single-image latency and batch-32 throughput, eager PyTorch vs ONNX Runtime, on the CPU."""
    from busi import checkpoint
    from busi.export import ExportedModel, export
    model = build(arch, 3).eval()
    ckpt = tmp / f"{arch}.pth"
    checkpoint.save(ckpt, model, {"arch": arch, "classes": ["benign", "malignant", "normal"], "image_size": size,
                                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})
    onnx = ExportedModel(export(ckpt, "onnx", tmp / f"{arch}.onnx", overwrite=True))
    from busi.export import Deployable
    eager = Deployable(model, checkpoint.read(ckpt)["config"]).eval()
    out = {}
    for name, run in (("eager", lambda x: eager(x)), ("onnxruntime", onnx.probabilities)):
        for batch in (1, 32):
            x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
            with torch.no_grad():
                for _ in range(3):
                    run(x)
                n = 20 if batch == 1 else 3
                start = time.perf_counter()
                for _ in range(n):
                    run(x)
                seconds = (time.perf_counter() - start) / n
            out[f"{name}_{'latency_ms' if batch == 1 else 'batch32_img_s'}"] = round(1000 * seconds, 1) if batch == 1 else round(batch / seconds, 1)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per measurement (after 2 warm-up)")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--json", help="also write the table as JSON")
    parser.add_argument("--md", help="write a markdown report")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--seed-experiment", action="store_true",
                        help="also time the whole seed experiment (both models, 25 epochs) end to end")
    parser.add_argument("--precision", default="auto", help="auto (default: bf16-mixed only where native), 32-true, bf16-mixed")
    parser.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"])
    args = parser.parse_args()
    device = "cuda" if args.accelerator == "gpu" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("speed.py: --accelerator gpu but no GPU is visible")
    layout = {"auto": "auto", "on": True, "off": False}[args.channels_last]
    cfg, notes = hardware.resolve(make_config({"precision": args.precision, "channels_last": layout, "batch_size": BATCH,
                                               "accelerator": args.accelerator, "devices": "1"}))
    hardware.announce(notes)
    capability = torch.cuda.get_device_name() if device == "cuda" else torch.backends.cpu.get_cpu_capability()
    machine = (torch.cuda.get_device_name() if device == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {capability}")
    native, why = hardware.native_bf16(device)
    peak32 = matmul_peak(device, torch.float32)
    # emulated bf16 is so slow that its "peak" says nothing and takes minutes: measured only where native
    peak16 = matmul_peak(device, torch.bfloat16) if native else None
    print(f"matmul 2048²: fp32 {peak32:.0f} GFLOP/s, bf16 {f'{peak16:.0f} GFLOP/s' if peak16 else 'not measured'} on "
          f"{machine}; training at {cfg.precision}, channels-last {'on' if cfg.channels_last else 'off'} ({why})", flush=True)
    peak = peak16 if cfg.precision.startswith("bf16") and peak16 else peak32
    dataset = scan(args.data)
    rows = []
    for arch in args.models:
        size = MODELS[arch]
        images, labels, _ = load(dataset, size, progress=False)
        ours = ours_rate(images, labels, arch, args.steps, cfg)
        reference = reference_rate(Path(args.data), arch, size, args.steps, device, cfg.precision)
        ceiling = ceiling_rate(arch, size, args.steps, cfg)
        flops = train_flops_per_image(arch, size)
        row = {"model": arch, "image_size": size, "ours_img_s": round(ours, 1), "reference_img_s": round(reference, 1),
               "ratio": round(ours / reference, 2), "device": machine, "cpu_capability": capability,
               "precision": cfg.precision, "channels_last": cfg.channels_last,
               "ceiling_img_s": round(ceiling, 1), "ours_share_of_ceiling": round(ours / ceiling, 3),
               "ours_gflop_s": round(ours * flops / 1e9, 1), "share_of_peak": round(ours * flops / 1e9 / peak, 3),
               "reference_share_of_peak": round(reference * flops / 1e9 / peak, 3),
               "epoch_seconds_ours": round(len(labels) / ours, 1), "epoch_seconds_reference": round(len(labels) / reference, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    seed_seconds = None
    if args.seed_experiment:
        seed_seconds = seed_experiment_seconds(args.data, args.accelerator)
        print(f"seed experiment: {seed_seconds:.0f} s wall time", flush=True)
    lat = {}
    if not args.no_latency and device == "cpu":
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            for arch in args.models:
                lat[arch] = latency(arch, MODELS[arch], Path(tmp))
                print(arch, json.dumps(lat[arch]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.md:
        write_markdown(Path(args.md), rows, lat, peak32, peak16, machine, args, cfg, why, seed_seconds)


def write_markdown(path: Path, rows, lat, peak32, peak16, machine, args, cfg, why, seed_seconds=None):
    bf16 = f"{peak16:.0f} GFLOP/s" if peak16 else "not measured (no native bf16)"
    lines = [f"# Speed ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {machine}; torch {torch.__version__}. Command: `python benchmarks/speed.py --data {args.data} "
             f"--accelerator {args.accelerator} --md {args.md}`", "",
             f"Precision: **{cfg.precision}** for ours and the reference alike (`--precision {args.precision}`: {why}); "
             f"channels-last {'on' if cfg.channels_last else 'off'} for ours, the reference keeps PyTorch's default "
             f"layout as the original did.", "",
             f"Measured matmul peak (2048², torch): fp32 {peak32:.0f} GFLOP/s, bf16 {bf16}.", "",
             "| model | size | ours img/s | reference img/s | ours / reference | random-tensor ceiling img/s | ours / ceiling "
             f"| epoch s (ours / ref, 624 images) | ours GFLOP/s | share of {cfg.precision} peak |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['image_size']} | {r['ours_img_s']} | {r['reference_img_s']} | **{r['ratio']}×** | "
                     f"{r['ceiling_img_s']} | {r['ours_share_of_ceiling']:.0%} | "
                     f"{r['epoch_seconds_ours']} / {r['epoch_seconds_reference']} | {r['ours_gflop_s']} | {r['share_of_peak']:.0%} |")
    if seed_seconds is not None:
        lines += ["", f"Whole seed experiment (both models, 25 epochs, 224 px, 70/30, {cfg.precision}): {seed_seconds:.0f} s wall time."]
    if lat:
        lines += ["", "Inference on this CPU (uint8 in, probabilities out, preprocessing inside):", "",
                  "| model | eager latency ms (1 image) | ONNX Runtime latency ms | eager img/s (batch 32) | ONNX Runtime img/s (batch 32) |",
                  "|---|---|---|---|---|"]
        for arch, v in lat.items():
            lines.append(f"| {arch} | {v['eager_latency_ms']} | {v['onnxruntime_latency_ms']} | {v['eager_batch32_img_s']} | "
                         f"{v['onnxruntime_batch32_img_s']} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
