"""Another hospital's folder: a subset of the classes, malignant vs benign with patient-level CIs, per-scanner figures."""
import csv
import json
import shutil

import pytest
import torch

from busi import checkpoint
from busi.cli import main
from busi.errors import BusiError
from busi.external import malignant_vs_benign, per_group
from busi.meta import read_meta
from busi.models import build

CLASSES = ["benign", "malignant", "normal"]


def _probs(p_mal):
    p_mal = torch.tensor(p_mal, dtype=torch.float)
    return torch.stack([(1 - p_mal) * 0.9, p_mal, (1 - p_mal) * 0.1], 1)


def test_auroc_sensitivity_specificity_on_a_known_case():
    probs = _probs([0.9, 0.8, 0.3, 0.2, 0.6, 0.1])
    labels = torch.tensor([1, 1, 1, 0, 0, 0])  # malignant, malignant, malignant, benign, benign, benign
    m = malignant_vs_benign(probs, labels, CLASSES, n_boot=200)
    assert m["auroc"]["estimate"] == pytest.approx(8 / 9, abs=1e-4)  # of 9 malignant-benign pairs only 0.3 < 0.6 is wrong
    assert m["sensitivity_argmax"]["estimate"] == pytest.approx(2 / 3, abs=1e-4)  # 0.3 is called benign
    assert m["specificity_argmax"]["estimate"] == pytest.approx(2 / 3, abs=1e-4)  # 0.6 is called malignant
    op = {"class": "malignant", "threshold": 0.25, "target_recall": 1.0, "fitted_on": 6}
    m = malignant_vs_benign(probs, labels, CLASSES, op, n_boot=200)
    assert m["sensitivity_operating_point"]["estimate"] == 1.0 and m["specificity_operating_point"]["estimate"] == pytest.approx(2 / 3, abs=1e-4)
    assert m["too_few"] and m["auroc"]["ci_low"] is None  # six images: figures, but no interval
    m = malignant_vs_benign(probs.repeat(4, 1), labels.repeat(4), CLASSES, op, n_boot=200)  # 24 images
    assert not m["too_few"] and m["auroc"]["estimate"] == pytest.approx(8 / 9, abs=1e-4)
    for k in ("auroc", "sensitivity_argmax", "specificity_operating_point"):
        assert m[k]["ci_low"] <= m[k]["estimate"] <= m[k]["ci_high"]
    assert malignant_vs_benign(probs, labels, ["a", "b", "c"]) is None  # no such question for other classes


def test_bootstrap_over_patients_keeps_each_patients_images_together():
    """Ten images each of twelve patients: resampling images pretends there are 120 independent cases, and its CI is
    far too narrow; resampling patients gives the honest, wider one."""
    scores, labels, patients = [], [], []
    for patient, (p, y) in enumerate([(0.9, 1), (0.7, 1), (0.4, 1), (0.2, 1), (0.8, 0), (0.3, 0), (0.1, 0), (0.05, 0),
                                      (0.6, 1), (0.95, 1), (0.5, 0), (0.15, 0)]):
        scores += [p] * 10
        labels += [y] * 10
        patients += [f"case {patient}"] * 10
    probs, labels = _probs(scores), torch.tensor(labels)
    by_image = malignant_vs_benign(probs, labels, CLASSES, n_boot=300)
    by_patient = malignant_vs_benign(probs, labels, CLASSES, clusters=patients, n_boot=300)
    assert by_patient["n_clusters"] == 12 and by_image["n_clusters"] == 120
    assert by_patient["auroc"]["estimate"] == by_image["auroc"]["estimate"]
    width = lambda m: m["auroc"]["ci_high"] - m["auroc"]["ci_low"]  # noqa: E731
    assert width(by_patient) > 1.5 * width(by_image)
    assert "patients" in by_patient["ci_method"]


def test_per_group_figures():
    probs = _probs([0.9, 0.1, 0.2, 0.8])
    labels = torch.tensor([1, 0, 1, 0])
    groups = per_group(probs, labels, CLASSES, ["GE", "GE", "Toshiba", "Toshiba"])
    assert groups["GE"]["malignant_vs_benign"]["auroc"]["estimate"] == 1.0 and groups["GE"]["accuracy"] == 1.0
    assert groups["Toshiba"]["malignant_vs_benign"]["auroc"]["estimate"] == 0.0 and groups["Toshiba"]["n"] == 2


def test_meta_csv_errors_and_counts(tmp_path):
    meta = tmp_path / "meta.csv"
    meta.write_text("ID,Case,Device\nbus_1,1,GE\nbus_2,1,GE\nbus_9,5,Toshiba\n")
    rows, notes = read_meta(meta, "ID", ["Case", "Device"], ["benign/bus_1.png", "malignant/bus_2.png", "benign/bus_3.png"])
    assert rows == {"benign/bus_1.png": {"Case": "1", "Device": "GE"}, "malignant/bus_2.png": {"Case": "1", "Device": "GE"}}
    assert any("1 row(s) name images that are not in the folder" in n for n in notes)
    assert any("1 image(s) have no row" in n for n in notes)
    with pytest.raises(BusiError, match="meta.csv: no column.s. Scanner"):
        read_meta(meta, "ID", ["Scanner"], ["benign/bus_1.png"])


def test_evaluate_a_benign_malignant_folder_with_meta(kaggle_folder, tmp_path, capsys):
    """BUS-BRA's shape: no normal class, a patient column and a scanner column."""
    ckpt = tmp_path / "m.pth"
    checkpoint.save(ckpt, build("custom-cnn", 3), {"arch": "custom-cnn", "classes": CLASSES, "image_size": 32,
                                                   "mean": [0.5] * 3, "std": [0.5] * 3})
    shutil.rmtree(kaggle_folder / "normal")
    with open(tmp_path / "meta.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ID", "Case", "Device"])
        for c in ("benign", "malignant"):
            for i in range(1, 9):
                w.writerow([f"{c} ({i})", f"{c}-{(i + 1) // 2}", "A" if i <= 4 else "B"])
    args = ["evaluate", "--checkpoint", str(ckpt), "--data", str(kaggle_folder), "--out", str(tmp_path / "ev"),
            "--no-progress", "--meta", str(tmp_path / "meta.csv"), "--group-column", "Device", "--patient-column", "Case"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "no normal images here" in out and "malignant vs benign: AUROC" in out
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["absent_classes"] == ["normal"] and m["per_class"]["normal"]["recall"] is None and m["n"] == 16
    assert m["malignant_vs_benign"]["n_clusters"] == 8  # two images per patient
    assert set(m["per_group"]) == {"A", "B"} and m["per_group"]["A"]["n"] == 8
    assert "No normal images in this folder" in (tmp_path / "ev" / "report.html").read_text()
    (tmp_path / "bad.csv").write_text("ID,Case\n")
    assert main([*args[:-6], "--meta", str(tmp_path / "bad.csv"), "--group-column", "Device", "--out", str(tmp_path / "e2")]) == 2
    assert "bad.csv: no column(s) Device" in capsys.readouterr().err
    (kaggle_folder / "cyst").mkdir()
    shutil.copy(kaggle_folder / "benign" / "benign (1).png", kaggle_folder / "cyst" / "c.png")
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(kaggle_folder), "--out", str(tmp_path / "e3")]) == 2
    assert "class folder(s) cyst are not among the model's classes" in capsys.readouterr().err
