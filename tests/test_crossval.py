import csv
import json

import numpy as np
import pytest
import torch

from busi.cli import main
from conftest import synthetic_scan
from busi.metrics import bootstrap_ci

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


def test_cv_split_source_holds_out_each_hospital_and_judges_it_with_its_patients(tmp_path, capsys):
    from conftest import make_kaggle_folder
    import shutil
    home = make_kaggle_folder(tmp_path / "home", per_class=12, size=64)
    other = tmp_path / "other"  # another hospital: benign and malignant only, two views per patient, a meta CSV
    rows = ["ID,Case,Device"]
    for label, name in enumerate(("benign", "malignant")):
        (other / name).mkdir(parents=True)
        for i in range(10):
            stem = f"bus_{label}{i:02d}-{'lr'[i % 2]}"
            synthetic_scan(label, seed=9000 + 50 * label + i, size=72).save(other / name / f"{stem}.png")
            rows.append(f"{stem},{label * 100 + i // 2},{'GE' if i < 5 else 'Toshiba'}")
    (tmp_path / "meta.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "recipe.yaml").write_text("malignant_recall: 0.9\nlesion_windows: 0.5\n")
    out = tmp_path / "cv"
    assert main(["cv", "--data", str(home), "--data", str(other), "--split", "source", "--meta", str(tmp_path / "meta.csv"),
                 "--patient-column", "Case", "--group-column", "Device", "--config", str(tmp_path / "recipe.yaml"),
                 "--model", "custom-cnn", "--val-size", "0.3", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "on source other, held out (trained on the other sources only)" in printed
    assert "on source other, after label-free adaptation to it" in printed
    folds = json.loads((out / "folds.json").read_text())
    assert folds["split"] == "source" and folds["folds"] == 2
    assert [sorted({p.split("/")[0] for p in fold}) for fold in folds["test_folds"][0]] == [["home"], ["other"]]
    summary = json.loads((out / "cv_metrics.json").read_text())["custom-cnn"]
    assert "patients and duplicate groups" in summary["ci_method"]
    held = summary["per_source"]["other"]
    assert held["n"] == 20 and held["malignant_vs_benign"]["n_clusters"] == 10  # two views per patient
    assert set(held["per_group"]) == {"GE", "Toshiba"} and "adapted" in held
    assert "operating_point" in held and held["operating_point"]["per_class"]["malignant"]["recall"] is not None
    page = (out / "report.html").read_text()
    assert "At a hospital it never saw" in page and "other, adapted (busi adapt)" in page and "None" not in page
    # the other hospital trains no 'normal', but lesion windows teach it: home's normal scans are judged fairly
    assert "untrained_classes" not in summary["per_source"]["home"]
    shutil.rmtree(out)
    (tmp_path / "recipe.yaml").write_text("malignant_recall: 0.9\n")
    assert main(["cv", "--data", str(home), "--data", str(other), "--split", "source", "--model", "custom-cnn",
                 "--config", str(tmp_path / "recipe.yaml"), "--out", str(out), *TINY]) == 0
    summary = json.loads((out / "cv_metrics.json").read_text())["custom-cnn"]
    assert summary["per_source"]["home"]["untrained_classes"] == ["normal"]
    assert "no normal in training: 3-class figures not meaningful" in capsys.readouterr().out


def test_split_source_needs_several_sources_and_is_for_cv_only(kaggle_folder, tmp_path, capsys):
    assert main(["cv", "--data", str(kaggle_folder), "--split", "source", "--out", str(tmp_path / "a"), *TINY]) == 2
    assert "needs two or more --data folders" in capsys.readouterr().err
    assert main(["train", "--data", str(kaggle_folder), "--split", "source", "--out", str(tmp_path / "b"), *TINY]) == 2
    assert "--split source is for `busi cv`" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
