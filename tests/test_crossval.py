import csv
import json

import numpy as np
import pytest
import torch

from busi.cli import main
from conftest import synthetic_scan
from busi.evaluate import bootstrap_ci

TINY = ["--epochs", "1", "--image-size", "32", "--batch-size", "8", "--no-progress"]


@pytest.mark.parametrize("val_size, ensemble", [("0", 1), ("0.2", 2)])
def test_cv_scores_every_image_once_with_groups_kept_together(kaggle_folder, tmp_path, capsys, val_size, ensemble):
    (tmp_path / "recipe.yaml").write_text(f"ensemble: {ensemble}\n")
    src = kaggle_folder / "benign" / "benign (1).png"
    for i in (20, 21):  # a near-duplicate group of three
        (kaggle_folder / "benign" / f"benign ({i}).png").write_bytes(src.read_bytes())
    out = tmp_path / "cv"
    assert main(["cv", "--data", str(kaggle_folder), "--config", str(tmp_path / "recipe.yaml"), "--model", "custom-cnn",
                 "--folds", "3", "--out", str(out), "--val-size", val_size, *TINY]) == 0
    rows = list(csv.DictReader(open(out / "oof_predictions.csv")))
    assert sorted(r["path"] for r in rows) == sorted({r["path"] for r in rows}) and len(rows) == 26
    folds = {r["path"]: r["fold"] for r in rows}
    assert len({folds[f"benign/benign ({i}).png"] for i in (1, 20, 21)}) == 1
    for r in rows:
        assert abs(sum(float(r[f"p_{c}"]) for c in ("benign", "malignant", "normal")) - 1) < 1e-4
    summary = json.loads((out / "cv_metrics.json").read_text())["custom-cnn"]
    for name in ("accuracy", "macro_f1", "auroc", "recall_malignant"):
        m = summary["metrics"][name]
        assert m["ci_low"] <= m["estimate"] <= m["ci_high"], name
    assert len(list(csv.DictReader(open(out / "fold_metrics.csv")))) == 3
    if ensemble > 1:  # each member's own out-of-fold score: the spread over training seeds
        alone = summary["members_alone"]
        assert len(alone["accuracy"]) == ensemble and all(0 <= a <= 1 for a in alone["accuracy"])
    else:
        assert "members_alone" not in summary
    assert "custom-cnn (grouped 3-fold x1): accuracy" in capsys.readouterr().out


def test_too_many_folds_fails_before_training(kaggle_folder, tmp_path, capsys):
    assert main(["cv", "--data", str(kaggle_folder), "--model", "custom-cnn", "--folds", "9", "--out", str(tmp_path / "x"), *TINY]) == 2
    assert "9 folds asked for, but the smallest class has only 8" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_bootstrap_ci_on_a_known_case():
    # 80 of 100 right, every image its own group: the interval must hold 0.8 and be about +-0.08 wide
    labels = torch.tensor([0, 1] * 50)
    right = torch.arange(100) < 80
    predicted = torch.where(right, labels, 1 - labels)
    probs = torch.nn.functional.one_hot(predicted, 3).float() * 0.9 + 0.05
    ci = bootstrap_ci(probs, labels, np.arange(100), ["a", "b", "c"], n_boot=2000, seed=0)
    acc = ci["accuracy"]
    assert acc["estimate"] == pytest.approx(0.8)
    assert 0.70 <= acc["ci_low"] <= 0.74 and 0.86 <= acc["ci_high"] <= 0.89
    # 10 copies of each image give no new evidence: resampling groups keeps the interval as wide
    many = bootstrap_ci(probs.repeat_interleave(10, 0), labels.repeat_interleave(10), np.arange(100).repeat(10),
                        ["a", "b", "c"], n_boot=2000, seed=0)["accuracy"]
    assert many["ci_high"] - many["ci_low"] == pytest.approx(acc["ci_high"] - acc["ci_low"], abs=0.03)


def test_cv_scores_another_hospitals_folder_with_every_fold_model(kaggle_folder, tmp_path, capsys):
    # another hospital: benign and malignant only, two images per patient, a scanner column
    other = tmp_path / "other"
    rows = ["ID,Case,Device"]
    for label, name in enumerate(("benign", "malignant")):
        (other / name).mkdir(parents=True)
        for i in range(6):
            synthetic_scan(label, seed=500 + 10 * label + i).save(other / name / f"{name}_{i}.png")
            rows.append(f"{name}_{i},{name}{i // 2},{'A' if i % 2 else 'B'}")
    (other / "meta.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "cv"
    assert main(["cv", "--data", str(kaggle_folder), "--model", "custom-cnn", "--folds", "2", "--out", str(out),
                 "--external", str(other), "--external-meta", str(other / "meta.csv"), "--external-patient-column",
                 "Case", "--external-group-column", "Device", *TINY]) == 0
    ext = json.loads((out / "cv_metrics.json").read_text())["custom-cnn"]["external"]
    assert ext["absent_classes"] == ["normal"] and ext["n"] == 12
    assert len(ext["fold_auroc_malignant_vs_benign"]) == 2
    mvb = ext["malignant_vs_benign"]
    assert mvb["n_clusters"] == 6 and mvb["ci_method"].startswith("95% percentile bootstrap over patients")
    assert set(ext["per_group"]) == {"A", "B"}
    preds = list(csv.DictReader(open(out / "custom-cnn" / "external_predictions.csv")))
    assert len(preds) == 12 and {r["true"] for r in preds} == {"benign", "malignant"}
    assert "another hospital" in (out / "report.html").read_text()
    assert "malignant-vs-benign AUROC" in capsys.readouterr().out


def test_cv_external_folder_sharing_no_class_is_one_line(kaggle_folder, tmp_path, capsys):
    (tmp_path / "other" / "cats").mkdir(parents=True)
    synthetic_scan(0, 1).save(tmp_path / "other" / "cats" / "a.png")
    assert main(["cv", "--data", str(kaggle_folder), "--model", "custom-cnn", "--folds", "2", "--out",
                 str(tmp_path / "cv"), "--external", str(tmp_path / "other"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "but the data has cats" in err and len(err.strip().splitlines()) == 1
