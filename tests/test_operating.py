"""The sensitivity-first operating point: chosen on a known case, stored by train, applied by predict/evaluate/export."""
import json

import pytest
import torch

from busi import checkpoint
from busi.cli import main
from busi.models import build
from busi.operating import decide, fit_threshold

CLASSES = ["benign", "malignant", "normal"]
TINY = ["--epochs", "1", "--image-size", "32", "--batch-size", "8", "--no-progress"]


def test_threshold_is_the_highest_that_reaches_the_target_recall():
    p_mal = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])  # ten malignant images
    probs = torch.stack([(1 - p_mal) * 0.7, p_mal, (1 - p_mal) * 0.3], 1)
    probs = torch.cat([probs, torch.tensor([[0.5, 0.45, 0.05]])])  # and one benign image
    labels = torch.tensor([1] * 10 + [0])
    op = fit_threshold(probs, labels, CLASSES, 0.8)
    assert op["threshold"] == pytest.approx(0.2) and op["recall_where_fitted"] == 0.8  # 8 of 10 at p >= 0.2
    assert op["fitted_on"] == 11 and op["fitted_on_positives"] == 10
    assert fit_threshold(probs, labels, CLASSES, 1.0)["threshold"] == pytest.approx(0.05)
    decided = decide(probs, CLASSES, op)
    assert decided.tolist() == [1] * 8 + [0, 0] + [1]  # the benign image (p_mal 0.45 >= 0.2) is called malignant too
    assert probs.argmax(1)[-1] == 0  # where argmax said benign
    assert fit_threshold(probs, torch.zeros(11, dtype=torch.long), CLASSES, 0.9) is None  # nothing to fit on
    assert fit_threshold(probs, labels, ["a", "b", "c"], 0.9) is None  # no malignant class


@pytest.fixture
def always_malignant(tmp_path):
    """A tiny model whose operating point (threshold 0) calls every image malignant, whatever argmax says."""
    path = tmp_path / "op.pth"
    checkpoint.save(path, build("custom-cnn", 3), {
        "arch": "custom-cnn", "classes": CLASSES, "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3,
        "operating_point": {"class": "malignant", "threshold": 0.0, "target_recall": 0.95, "fitted_on": 10}})
    return path


def test_predict_evaluate_and_export_apply_the_stored_operating_point(always_malignant, kaggle_folder, tmp_path, capsys):
    assert main(["predict", "--checkpoint", str(always_malignant), "--json", str(kaggle_folder / "normal")]) == 0
    out = capsys.readouterr()
    rows = json.loads(out.out)
    assert rows and all(r["predicted"] == "malignant" and "predicted_argmax" in r for r in rows)
    assert "decision rule: 'malignant' whenever its probability is at least 0.000" in out.err

    assert main(["evaluate", "--checkpoint", str(always_malignant), "--data", str(kaggle_folder), "--out",
                 str(tmp_path / "ev"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Decision rule: 'malignant' whenever" in printed and "At this rule it found" in printed
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    op = metrics["operating_point"]
    assert op["per_class"]["malignant"]["recall"] == 1.0 and op["per_class"]["benign"]["recall"] == 0.0
    assert "accuracy" in metrics and metrics["operating_point"]["threshold"] == 0.0  # argmax figures stay beside it

    onnx = tmp_path / "op.onnx"
    assert main(["export", "--checkpoint", str(always_malignant), "--format", "onnx", "--out", str(onnx)]) == 0
    assert "decision rule" in capsys.readouterr().out
    assert main(["predict", "--checkpoint", str(onnx), "--json", str(kaggle_folder / "normal")]) == 0
    assert all(r["predicted"] == "malignant" for r in json.loads(capsys.readouterr().out))


def test_train_and_cv_choose_the_threshold_on_the_validation_part(kaggle_folder, tmp_path, capsys):
    (tmp_path / "op.yaml").write_text("malignant_recall: 0.9\nval_size: 0.3\nmodels: [custom-cnn]\n")
    assert main(["train", "--data", str(kaggle_folder), "--config", str(tmp_path / "op.yaml"), "--test-size", "0.3",
                 "--out", str(tmp_path / "run"), *TINY]) == 0
    _, config = checkpoint.load(tmp_path / "run" / "custom-cnn" / "checkpoint.pth")
    op = config["operating_point"]
    assert op["target_recall"] == 0.9 and 0 <= op["threshold"] <= 1 and op["recall_where_fitted"] >= 0.9
    assert op["fitted_on"] == len(json.loads((tmp_path / "run" / "split.json").read_text())["val"])
    assert "operating_point" in json.loads((tmp_path / "run" / "custom-cnn" / "metrics.json").read_text())

    assert main(["cv", "--data", str(kaggle_folder), "--config", str(tmp_path / "op.yaml"), "--folds", "2",
                 "--out", str(tmp_path / "cv"), *TINY]) == 0
    summary = json.loads((tmp_path / "cv" / "cv_metrics.json").read_text())["custom-cnn"]
    assert len(summary["operating_point"]["thresholds"]) == 2
    assert sum(map(sum, summary["operating_point"]["confusion_matrix"])) == summary["n_predictions"]
    assert "at the operating point" in capsys.readouterr().out


def test_operating_point_needs_a_validation_part(kaggle_folder, tmp_path, capsys):
    assert main(["train", "--data", str(kaggle_folder), "--val-size", "0", "--out", str(tmp_path / "x"), *TINY,
                 "--model", "custom-cnn", "--config", str(_yaml(tmp_path, "malignant_recall: 0.9\n"))]) == 2
    assert "needs a validation part" in capsys.readouterr().err


def _yaml(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path
