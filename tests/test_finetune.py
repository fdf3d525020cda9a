import json
import shutil

import pytest

from busi import checkpoint
from busi.cli import main
from busi.inference import run_predict
from conftest import make_kaggle_folder


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A small model that knows all three synthetic classes, normal included."""
    root = tmp_path_factory.mktemp("parent")
    data = make_kaggle_folder(root / "train", per_class=20, size=64)
    assert main(["train", "--data", str(data), "--model", "custom-cnn", "--epochs", "15", "--lr", "0.001",
                 "--batch-size", "8", "--image-size", "32", "--test-size", "0", "--val-size", "0.25",
                 "--out", str(root / "run"), "--no-progress"]) == 0
    return root / "run" / "custom-cnn" / "checkpoint.pth"


def _normal_recall(ckpt, folder):
    rows = run_predict(ckpt, [folder / "normal"])
    return sum(max(r["probabilities"], key=r["probabilities"].get) == "normal" for r in rows) / len(rows)


def test_finetune_on_benign_and_malignant_only_keeps_normal(parent, tmp_path, capsys):
    test = make_kaggle_folder(tmp_path / "test", per_class=10, size=80)
    assert _normal_recall(parent, test) >= 0.9
    local = make_kaggle_folder(tmp_path / "local", per_class=20, size=72)
    shutil.rmtree(local / "normal")  # another hospital's benign/malignant set
    out = tmp_path / "ft"
    assert main(["finetune", "--checkpoint", str(parent), "--data", str(local), "--epochs", "8", "--lr", "0.001",
                 "--batch-size", "8", "--out", str(out), "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "fine-tuned from" in said and "malignant recall to expect on new patients" in said
    tuned = out / "custom-cnn" / "checkpoint.pth"
    # its rule is set on every adapt image, each scored by a model tuned the same way without it: not a small slice
    op = checkpoint.read(tuned)["config"]["operating_point"]
    assert op["cross_fit_folds"] == 2 and op["fitted_on"] == 40 and op["fitted_on_positives"] == 20
    assert "out-of-fold predictions of 40 images" in op["fitted_where"] and op["recall_ci"]
    crossfit = json.loads((out / "cross_fit.json").read_text())
    assert len(crossfit["predictions"]) == 40 and crossfit["replaced"]["fitted_on_positives"] < 20
    # the tuned model beside its parent on the same held-apart images, each at its own rule
    assert main(["evaluate", "--checkpoint", str(tuned), "--compare", str(parent), "--data", str(test),
                 "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "side by side on the same images" in said and said.count("recall target") == 2
    side = json.loads((tmp_path / "ev" / "comparison.json").read_text())
    assert set(side) == {str(tuned), str(parent)} and all(v["images"] == 30 for v in side.values())
    tuned_side, parent_side = side[str(tuned)], side[str(parent)]
    assert tuned_side["keeps_target"] == (tuned_side["sensitivity"] >= tuned_side["target_recall"] == 0.9)
    assert parent_side["target_recall"] is None and "has no recall target" in said  # the parent decides by argmax
    # a plain fine-tune (cross-entropy over every class, no distillation) measured 0.0 here: normal forgotten
    assert _normal_recall(tuned, test) >= 0.8
    _, config, extras = checkpoint.load(tuned, extras=True)
    assert config["parent"]["checkpoint"] == str(parent) and config["classes"] == ["benign", "malignant", "normal"]
    assert sum(p.startswith("parent:") for p in config["fingerprint_paths"]) == 60  # its parent's images too
    assert len(extras["fingerprints.phash"]) == len(config["fingerprint_paths"])


def test_finetune_refuses_one_class_foreign_classes_and_a_changed_input_size(parent, tmp_path, capsys):
    one = make_kaggle_folder(tmp_path / "one", per_class=6, size=64)
    for c in ("benign", "normal"):
        shutil.rmtree(one / c)
    assert main(["finetune", "--checkpoint", str(parent), "--data", str(one), "--out", str(tmp_path / "a"),
                 "--no-progress"]) == 2
    assert "holds only malignant; a classifier needs images of at least two classes" in capsys.readouterr().err
    foreign = make_kaggle_folder(tmp_path / "foreign", per_class=6, size=64)
    (foreign / "normal").rename(foreign / "cyst")
    assert main(["finetune", "--checkpoint", str(parent), "--data", str(foreign), "--out", str(tmp_path / "b"),
                 "--no-progress"]) == 2
    assert "cyst are not among the model's classes" in capsys.readouterr().err
    assert main(["finetune", "--checkpoint", str(parent), "--data", str(one.parent / "foreign"), "--epochs", "1",
                 "--out", str(tmp_path / "c"), "--config", str(_yaml(tmp_path, "image_size: 64"))]) == 2
    assert "'image_size' is 32" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")


def _yaml(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text + "\n")
    return path
