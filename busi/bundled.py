"""The trained model that ships inside the package: where it is, its card, and how a run becomes it."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import torch
import yaml

from . import __version__, checkpoint
from .errors import BusiError

ASSETS = Path(__file__).resolve().parent / "assets"
MODEL = ASSETS / "recommended.pth"
CARD = ASSETS / "MODEL_CARD.md"
CARD_DATA = ASSETS / "card.json"  # what the card says, for machines (and the test that holds the file to it)
REBUILD = "python scripts/bundle_model.py --data Dataset_BUSI_with_GT"
# Keys that say how, not what, a run trained: they may differ between the bundled run and configs/recommended.yaml.
RUN_ONLY_KEYS = ("data", "precision", "channels_last", "accelerator", "devices", "strategy", "num_nodes", "busi_version",
                 "command")


def default_checkpoint(say=None) -> Path:
    """The bundled model's path, checked; says in one line (stderr) that it is the one in use."""
    if not MODEL.is_file():
        raise BusiError(f"{MODEL}: no bundled model in this installation; pass --checkpoint FILE, or rebuild it "
                        f"from a source checkout: {REBUILD}")
    try:
        checkpoint.read(MODEL)
    except BusiError as e:
        raise BusiError(f"{e}; the bundled model is damaged: reinstall busi, rebuild it ({REBUILD}) "
                        f"or pass --checkpoint FILE") from None
    (say or (lambda line: print(line, file=sys.stderr)))(
        f"busi: using the bundled model ({MODEL.name}: EfficientNet-Lite0 trained on BUSI; `busi model` shows its card)")
    return MODEL


def card_text() -> str:
    if not CARD.is_file():
        raise BusiError(f"{CARD}: no model card in this installation (rebuild: {REBUILD})")
    return CARD.read_text()


def recipe_of(config: dict) -> dict:
    """The recipe part of a run's config: every key but those that only say where and on what hardware it ran."""
    return {k: v for k, v in config.items() if k not in RUN_ONLY_KEYS}


def bundle(run: Path, recipe_file: Path, examples: Path, command: str, out: Path = MODEL) -> dict:
    """Turn a finished `busi train` run of the recommended recipe into the bundled model: fp16 tensors where they move
    no probability of the example images by more than 1e-3, else fp32, with the card's data (card.json) beside it."""
    from .inference import run_predict
    run_config = yaml.safe_load((run / "config.yaml").read_text())
    recipe = yaml.safe_load(recipe_file.read_text())
    differ = sorted(k for k, v in recipe_of(recipe).items() if run_config.get(k) != v)
    if differ:
        raise BusiError(f"{run}: was not trained with {recipe_file} (differs in {', '.join(differ)})")
    arch = run_config["models"][0]
    source = run / arch / "checkpoint.pth"
    model, config = checkpoint.load(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    full = run_predict(source, [examples])

    def saved_as(dtype):  # -> (rows predicted by the saved file, largest change of a probability against the run's)
        checkpoint.save(out, model, config, dtype=dtype)
        rows = run_predict(out, [examples])
        return rows, max(abs(a["probabilities"][c] - b["probabilities"][c]) for a, b in zip(full, rows) for c in a["probabilities"])
    stored = "float16"
    half, drift = saved_as(torch.float16)  # half the size, if it changes no answer noticeably
    if drift > 1e-3:  # fp16 moved a probability by more than 1e-3: ship the fp32 tensors as trained
        stored = "float32"
        half, drift = saved_as(None)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    data = {
        "model": arch, "classes": config["classes"], "image_size": config["image_size"],
        "temperature": config.get("temperature"), "operating_point": config.get("operating_point"),
        "recipe": recipe_of(run_config), "trained_with": {k: run_config.get(k) for k in ("precision", "channels_last")},
        "command": command, "commit": commit or "unknown", "bundled_at": datetime.now().isoformat(timespec="seconds"),
        "trained_at": config.get("trained_at"), "train_seconds": config.get("train_seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                   f"{torch.backends.cpu.get_cpu_capability()}",
        "busi_version": __version__, "stored_as": stored, "max_probability_change": round(drift, 7),
        "size_bytes": out.stat().st_size,
        "examples": [{"image": str(Path(r["path"]).relative_to(examples.parent)), "predicted": r["predicted"],
                      "probabilities": r["probabilities"]} for r in half],
    }
    (out.parent / CARD_DATA.name).write_text(json.dumps(data, indent=2) + "\n")
    return data
