"""Which precision and memory layout to train in: 'auto' resolved from what this machine computes natively."""
from __future__ import annotations

import dataclasses
import sys

import torch

from .config import RunConfig


def device_type(accelerator: str) -> str:
    """'cuda', 'mps', 'cpu' …: where Lightning will put the model for this --accelerator."""
    if accelerator in ("gpu", "cuda"):
        return "cuda"
    if accelerator != "auto":
        return accelerator
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def onednn_bf16() -> bool:
    """oneDNN's own verdict (False where ONEDNN_MAX_CPU_ISA or ATEN_CPU_CAPABILITY hold it below AVX-512)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_bf16_instructions() -> list[str]:
    cpu = getattr(torch, "cpu", None)
    checks = (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx", "_is_amx_tile_supported"))
    return [name for name, check in checks if cpu is not None and hasattr(cpu, check) and getattr(cpu, check)()]


def cpu_bf16() -> tuple[bool, str]:
    """(native bf16 on this CPU?, why): oneDNN must support bf16 *and* the CPU must have instructions for it.

    Measured on 2-core AMD EPYCs (benchmarks/speed.md): where bf16 is emulated a ResNet-18 training step runs ~8x
    slower than in fp32; with AVX512-BF16 the same step runs ~1.8x faster than in fp32. oneDNN also 'supports' bf16 on AVX-512 CPUs without AVX512-BF16 (Skylake), by converting: not faster than fp32.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    onednn, instructions = onednn_bf16(), cpu_bf16_instructions()
    if onednn and instructions:
        return True, f"this CPU computes bf16 natively ({capability}, {' and '.join(instructions)})"
    missing = "oneDNN reports no bf16 support" if not onednn else "no AVX512-BF16 or AMX instructions"
    return False, f"this CPU has no native bf16 ({capability}, {missing}): bf16 would be emulated, several times slower"


def cuda_bf16() -> tuple[bool, str]:
    if not torch.cuda.is_available():  # Lightning then says --accelerator gpu cannot work here
        return False, "no CUDA device is visible"
    major, minor = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    if major >= 8:  # Ampere and newer have bf16 tensor cores
        return True, f"{name} (compute capability {major}.{minor}) computes bf16 natively"
    return False, f"{name} (compute capability {major}.{minor}) has no bf16 tensor cores"


def native_bf16(device: str) -> tuple[bool, str]:
    if device == "cuda":
        return cuda_bf16()
    if device == "cpu":
        return cpu_bf16()
    return False, f"bf16 support on '{device}' is not checked"


def resolve(cfg: RunConfig) -> tuple[RunConfig, list[str]]:
    """(cfg with precision and channels_last made concrete, lines that say which and why; warnings start 'busi: warning:').

    The run's config.yaml records the resolved values, so the run can be repeated exactly elsewhere.
    """
    notes = []
    say = notes.append
    device = device_type(cfg.accelerator)
    precision, channels_last = cfg.precision, cfg.channels_last
    if precision == "auto" or precision.startswith("bf16"):
        native, why = native_bf16(device)
        if precision == "auto":
            precision = "bf16-mixed" if native else "32-true"
            say(f"busi: precision {precision} (auto: {why})")
        elif not native and device == "cpu":
            say(f"busi: warning: --precision {precision} asked for, but {why}; '--precision auto' picks 32-true here")
    if channels_last == "auto":
        # NHWC was faster for every model we timed on CPU, fp32 and bf16 alike (benchmarks/speed.md), and feeds
        # tensor cores on CUDA; other backends keep the default layout.
        channels_last = device in ("cpu", "cuda")
        say(f"busi: channels-last {'on' if channels_last else 'off'} (auto, {device})")
    return dataclasses.replace(cfg, precision=precision, channels_last=bool(channels_last)), notes


def announce(notes: list[str]) -> None:
    """Print resolve()'s lines: warnings on stderr, the rest on stdout with the run's other progress."""
    for line in notes:
        print(line, file=sys.stderr if line.startswith("busi: warning:") else sys.stdout, flush=True)
