"""busi split: a labelled folder cut by patient into adapt/ and test/, the same way for the same seed."""
import csv
import json

import pytest

from busi.cli import main
from busi.errors import BusiError
from busi.partition import run_split


@pytest.fixture
def hospital(tmp_path):
    """A generated folder whose images belong to patients of two images each, with a meta CSV naming them."""
    from conftest import make_kaggle_folder
    data = make_kaggle_folder(tmp_path / "hospital", per_class=8, size=64)
    with open(tmp_path / "meta.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ID", "Case"])
        for cls in ("benign", "malignant", "normal"):
            for i in range(1, 9):
                w.writerow([f"{cls} ({i})", f"{cls}-patient-{(i + 1) // 2}"])
    return data, tmp_path / "meta.csv"


def _images(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*).png"))


def test_split_keeps_each_patient_on_one_side_and_repeats_itself(hospital, tmp_path, capsys):
    data, meta = hospital
    assert main(["split", str(data), "--out", str(tmp_path / "a"), "--meta", str(meta), "--patient-column", "Case",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "adapt/" in out and "patients" in out and "busi evaluate" in out
    sides = {part: _images(tmp_path / "a" / part) for part in ("adapt", "test")}
    assert sides["adapt"] and sides["test"] and not set(sides["adapt"]) & set(sides["test"])
    assert len(sides["adapt"]) + len(sides["test"]) == 24
    for part in ("adapt", "test"):  # every class on both sides, masks beside their images, CSV rows following them
        assert {p.split("/")[0] for p in sides[part]} == {"benign", "malignant", "normal"}
        assert all((tmp_path / "a" / part / p.replace(").png", ")_mask.png")).is_file() for p in sides[part])
        rows = list(csv.DictReader(open(tmp_path / "a" / f"{part}.csv")))
        assert sorted(r["ID"] for r in rows) == sorted(p.split("/")[1][:-4] for p in sides[part])
    patient = {r["ID"]: r["Case"] for r in csv.DictReader(open(meta))}
    by_side = [{patient[p.split("/")[1][:-4]] for p in sides[part]} for part in ("adapt", "test")]
    assert not by_side[0] & by_side[1]  # no patient on both sides
    summary = json.loads((tmp_path / "a" / "split.json").read_text())
    assert summary["adapt"]["patients"] + summary["test"]["patients"] == 12
    run_split(data, tmp_path / "b", meta=meta, patient_column="Case", progress=False)
    assert _images(tmp_path / "b" / "test") == sides["test"]  # same seed, same cut


def test_split_mistakes_are_one_line_and_leave_nothing(hospital, tmp_path, capsys):
    data, meta = hospital
    assert main(["split", str(data), "--out", str(tmp_path / "x"), "--meta", str(meta), "--patient-column",
                 "Patient"]) == 2
    err = capsys.readouterr().err
    assert "no column(s) Patient" in err and "Case" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()
    with pytest.raises(BusiError, match="between 0 and 1"):
        run_split(data, tmp_path / "y", test_size=1.5)
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "keep.txt").write_text("mine")
    with pytest.raises(BusiError, match="already holds files"):
        run_split(data, tmp_path / "z", progress=False)
    assert (tmp_path / "z" / "keep.txt").read_text() == "mine"
