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


def _hospital(seed: int, counts=(60, 30, 60), normal_scores=(0.0, 0.45), lesion_scores=(0.3, 1.0), missed=3):
    """(probs, lesion scores, labels) of one hospital: normal scans score lower than lesions, with an overlap; `missed`
    cancers have no lesion found at all (score 0.01), however high their p(malignant)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([k for k, n in enumerate(counts) for _ in range(n)])
    probs = torch.softmax(torch.randn(len(labels), 3, generator=g) + 1.5 * torch.nn.functional.one_hot(labels, 3), 1)
    low, high = (torch.tensor(v) for v in (normal_scores, lesion_scores))
    u = torch.rand(len(labels), generator=g)
    scores = torch.where(labels == 2, low[0] + u * (low[1] - low[0]), high[0] + u * (high[1] - high[0]))
    cancers = torch.argwhere(labels == 1).flatten()[:missed]
    scores[cancers] = 0.01
    probs[cancers] = torch.tensor([0.05, 0.9, 0.05])
    return probs, scores, labels


def test_joint_rule_keeps_the_cancers_counting_those_with_no_lesion_found_as_missed():
    from busi.operating import fit_joint_rule
    probs, scores, labels = _hospital(0)
    rule = fit_joint_rule(probs, scores, labels, CLASSES, malignant_recall=0.9)
    called = decide(probs, CLASSES, rule, scores)
    malignant = labels == 1
    found = int((called[malignant] == 1).sum())
    assert found >= 27 and found / 30 == pytest.approx(rule["where_fitted"]["malignant_recall"], abs=1e-4)
    # the three cancers with no lesion found are called normal whatever their p(malignant) (0.9): they are missed,
    # so the malignant threshold must reach 27 of the other 27 found
    assert (called[torch.argwhere(malignant).flatten()[:3]] == 2).all()
    # among rules that keep the recall it calls normal scans normal: the lesion threshold rises past the normal scans
    # (scores below 0.45) as far as the lesions (0.3 and up) allow
    normal_recall = int((called[labels == 2] == 2).sum()) / 60
    assert rule["lesion_threshold"] > 0.2 and normal_recall > 0.5
    assert normal_recall == pytest.approx(rule["where_fitted"]["normal_recall"], abs=1e-4)
    assert int((called[labels != 2] == 2).sum()) <= 9  # the cap: at most 10% of the 90 lesions called normal
    # a rule that asks for more cancers calls fewer normal scans and benign lesions right, never more
    strict = fit_joint_rule(probs, scores, labels, CLASSES, malignant_recall=0.97)
    at = strict["where_fitted"]
    assert at["malignant_recall"] >= 0.9666
    assert at["normal_recall"] + at["benign_called_benign"] <= (rule["where_fitted"]["normal_recall"]
                                                                + rule["where_fitted"]["benign_called_benign"]) + 1e-9


def test_joint_rule_holds_the_recall_at_every_hospital_when_told_their_groups():
    from busi.operating import fit_joint_rule, lesion_rule_figures
    a, b = _hospital(1, missed=0), _hospital(2, lesion_scores=(0.05, 0.6), missed=2)  # b's lesions score lower
    probs, scores, labels = (torch.cat([x, y]) for x, y in zip(a, b))
    groups = ["a"] * len(a[2]) + ["b"] * len(b[2])
    pooled = fit_joint_rule(probs, scores, labels, CLASSES, 0.9)
    each = fit_joint_rule(probs, scores, labels, CLASSES, 0.9, groups=groups)
    figures = lesion_rule_figures(probs, scores, labels, CLASSES, each, groups)
    assert all(f["lesion_first"]["sensitivity"] >= 0.8999 for f in figures.values())
    assert each["lesion_threshold"] <= pooled["lesion_threshold"] and each["threshold"] <= pooled["threshold"]


def test_joint_rule_keeps_a_given_lesion_threshold_and_refuses_too_few_cancers():
    from busi.errors import BusiError
    from busi.operating import fit_joint_rule
    probs, scores, labels = _hospital(3)
    kept = fit_joint_rule(probs, scores, labels, CLASSES, 0.9, lesion_threshold=0.123)
    assert kept["lesion_threshold"] == 0.123 and kept["fitted_jointly"] is False
    few = torch.cat([torch.argwhere(labels != 1).flatten(), torch.argwhere(labels == 1).flatten()[:5]])
    with pytest.raises(BusiError, match="at least 10"):
        fit_joint_rule(probs[few], scores[few], labels[few], CLASSES, 0.9)


def test_cross_fitted_promise_judges_each_patient_by_a_rule_fitted_without_them():
    from busi.operating import cross_fitted
    probs, scores, labels = _hospital(4, counts=(80, 40, 80))
    patients = [f"p{i // 2}" for i in range(len(labels))]  # two images a patient
    promise = cross_fitted(probs, scores, labels, CLASSES, 0.9, patients, folds=5)
    assert promise["folds"] == 5 and promise["images_decided"] == len(labels)
    low, high = promise["recall_ci"]
    assert low <= promise["malignant_recall"] <= high and high - low > 0
    assert "patients" in promise["ci_method"] and promise["normal_recall"] is not None


def test_the_basis_of_a_decision_is_the_figure_it_was_judged_on():
    from busi.operating import basis
    rule = {"rule": "lesion-first", "class": "malignant", "threshold": 0.2, "lesion_threshold": 0.3}
    p = torch.tensor([0.60, 0.16, 0.24])  # p(malignant) 16%, but 21% of what the classifier gives lesions: malignant
    said = basis(p, 0.8, CLASSES, rule, 1)
    assert said["figure"] == "p(malignant | lesion)" and said["value"] == pytest.approx(0.16 / 0.76, abs=1e-4)
    assert said["text"] == "malignant: lesion found, p(malignant | lesion) 21% >= 20%"
    normal = basis(torch.tensor([0.05, 0.9, 0.05]), 0.1, CLASSES, rule, 2)
    assert normal["figure"] == "lesion score" and "no lesion found" in normal["text"] and "0.10 < 0.30" in normal["text"]
    plain = basis(torch.tensor([0.3, 0.25, 0.45]), None, CLASSES, {"class": "malignant", "threshold": 0.2}, 1)
    assert plain["text"] == "malignant: p(malignant) 25% >= 20%"
    assert basis(torch.tensor([0.3, 0.25, 0.45]), None, CLASSES, None, 2)["threshold"] is None


def test_a_familiar_only_rule_calls_normal_only_a_scan_that_looks_like_its_training_images():
    """operating.FAMILIAR_ONLY: a scan the shift check flags counts as a lesion found, whatever its lesion score; the
    same scan unflagged, or under a rule without the key, is called normal; the basis says why."""
    from busi.operating import FAMILIAR_ONLY, basis, describe, guarded
    rule = {"rule": "lesion-first", "class": "malignant", "threshold": 0.5, "lesion_threshold": 0.3,
            "target_recall": 0.9, "fitted_on_positives": 30}
    probs = torch.tensor([[0.30, 0.65, 0.05], [0.30, 0.65, 0.05], [0.80, 0.10, 0.10]])
    scores = torch.tensor([0.05, 0.05, 0.9])  # no lesion found in the first two
    outside = torch.tensor([True, False, True])
    assert decide(probs, CLASSES, rule, guarded(scores, outside, rule)).tolist() == [2, 2, 0]  # no key: untouched
    familiar = {**rule, FAMILIAR_ONLY: True}
    assert decide(probs, CLASSES, familiar, guarded(scores, outside, familiar)).tolist() == [1, 2, 0]
    assert guarded(scores, None, familiar) is scores  # a model without a shift summary: nothing to guard with
    said = basis(probs[0], 0.05, CLASSES, familiar, 1)  # the score shown is the one measured, not the guard's 1
    assert said["text"].startswith("malignant: judged as a lesion: unlike the images it trained on (lesion score 0.05)")
    assert "looks like the images the model trained on" in describe(familiar)
    assert "looks like" not in describe(rule)
