import json

import pytest
import torch
from torch import nn

from busi import checkpoint
from busi.adapt import adapt_batchnorm
from busi.cli import main
from busi.errors import BusiError
from busi.operating import fit_with_ci
from conftest import make_kaggle_folder

CLASSES = ["benign", "malignant", "normal"]


def test_adapted_batchnorm_holds_the_statistics_of_the_new_images_and_nothing_else_moves():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))
    model(torch.zeros(2, 3, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(100, 200, (40, 3, 8, 8), dtype=torch.uint8)  # a brighter scanner
    adapted = adapt_batchnorm(model, images, (0.5,) * 3, (0.5,) * 3)
    with torch.no_grad():
        conv = model[0]((images.float() / 255 - 0.5) / 0.5)
    bn = adapted[1]
    assert torch.allclose(bn.running_mean, conv.mean(dim=(0, 2, 3)), atol=1e-4)
    assert torch.allclose(bn.running_var, conv.var(dim=(0, 2, 3)), rtol=0.05)
    for k, v in adapted.state_dict().items():  # weights kept; the parent itself untouched
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, before[k]), k
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.fixture
def trained(tmp_path):
    data = make_kaggle_folder(tmp_path / "train", per_class=20, size=64)
    assert main(["train", "--data", str(data), "--model", "resnet18", "--no-pretrained", "--epochs", "1",
                 "--image-size", "32", "--test-size", "0", "--val-size", "0.5", "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 0
    return tmp_path / "run" / "resnet18" / "checkpoint.pth"


def test_adapt_writes_a_checkpoint_like_any_other_and_refuses_folders_without_images(trained, tmp_path, capsys):
    target = make_kaggle_folder(tmp_path / "other", per_class=6, size=80)
    assert main(["adapt", "--checkpoint", str(trained), "--data", str(target), "--out", str(tmp_path / "ad"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "adapted to 18 images" in out and "its decision threshold is the parent's:" in out  # none for adapted ones
    model, config, extras = checkpoint.load(tmp_path / "ad" / "checkpoint.pth", extras=True)
    parent, parent_config = checkpoint.load(trained)
    assert config["adapted"]["n_images"] == 18 and config["parent"]["checkpoint"] == str(trained)
    assert "shift" not in config and not any(k.startswith("shift.") for k in extras)  # it described the parent
    assert not torch.equal(model.bn1.running_mean, parent.bn1.running_mean)
    assert torch.equal(model.fc.weight, parent.fc.weight)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("no images here")
    assert main(["adapt", "--checkpoint", str(trained), "--data", str(tmp_path / "text"), "--out", str(tmp_path / "x")]) == 2
    assert "no image files found" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_threshold_with_ci_on_a_known_case():
    # 50 malignant images with p(malignant) 0.02 .. 1.00: 90% recall needs the threshold at the 45th highest, 0.12
    p = torch.cat([torch.linspace(0.02, 1.0, 50), torch.full((50,), 0.05)])
    probs = torch.stack([1 - p, p, torch.zeros(100)], 1)
    labels = torch.tensor([1] * 50 + [0] * 50)
    point = fit_with_ci(probs, labels, CLASSES, 0.9)
    assert point["threshold"] == pytest.approx(0.12, abs=1e-6) and point["recall_where_fitted"] == pytest.approx(0.9)
    assert point["others_called_malignant"] == 0.0  # the benign images all sit at 0.05
    low, high = point["recall_ci"]
    assert 0.5 < low <= point["expected_recall"] <= high <= 1.0
    with pytest.raises(BusiError, match="9 malignant image"):
        fit_with_ci(probs[41:], labels[41:], CLASSES, 0.9)


def test_calibrate_replaces_the_operating_point_and_keeps_the_weights(trained, tmp_path, capsys):
    labelled = make_kaggle_folder(tmp_path / "local", per_class=12, size=64)
    assert main(["calibrate", "--checkpoint", str(trained), "--data", str(labelled), "--malignant-recall", "0.75",
                 "--out", str(tmp_path / "cal"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "of the 12 malignant images" in out and "recall to expect on new patients" in out
    model, config = checkpoint.load(tmp_path / "cal" / "checkpoint.pth")
    op = config["operating_point"]
    assert op["target_recall"] == 0.75 and op["fitted_on"] == 36 and op["fitted_on_positives"] == 12
    assert op["recall_where_fitted"] >= 0.75
    record = json.loads((tmp_path / "cal" / "calibrate.json").read_text())
    assert record["operating_point"] == op
    parent, _ = checkpoint.load(trained)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), parent.state_dict().values()))
    few = make_kaggle_folder(tmp_path / "few", per_class=5, size=64)
    assert main(["calibrate", "--checkpoint", str(trained), "--data", str(few), "--out", str(tmp_path / "no"),
                 "--no-progress"]) == 2
    assert "5 malignant image(s)" in capsys.readouterr().err and not (tmp_path / "no").exists()


def test_adapt_switches_to_the_threshold_fitted_for_adapted_models(tmp_path):
    from busi.adapt import run_adapt
    from busi.models import build
    parent = tmp_path / "p.pth"
    plain = {"class": "malignant", "threshold": 0.4, "target_recall": 0.9, "fitted_on": 100, "fitted_on_positives": 30}
    after = {**plain, "threshold": 0.25}
    checkpoint.save(parent, build("resnet18", 3), {"arch": "resnet18", "classes": CLASSES, "image_size": 32,
                                                   "mean": [0.5] * 3, "std": [0.5] * 3, "operating_point": plain,
                                                   "operating_point_after_adapt": after})
    images = make_kaggle_folder(tmp_path / "scanner", per_class=6, size=64)
    record, folder = run_adapt(parent, images, tmp_path / "ad")
    _, config = checkpoint.load(folder / "checkpoint.pth")
    assert config["operating_point"] == after and "operating_point_after_adapt" not in config
    assert "adapted models" in record["operating_point"]
