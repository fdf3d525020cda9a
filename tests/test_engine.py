"""ONNX Runtime as the engine of predict and evaluate: the same answers as PyTorch, exported once per checkpoint."""
import pytest

from busi import engine
from busi.cli import main
from busi.errors import BusiError
from busi.inference import run_predict


@pytest.fixture(scope="module")
def shifted_lesion_model(tmp_path_factory):
    """A tiny model with a segmenter and a shift summary (a validation part of 20+ images)."""
    import yaml
    from conftest import make_kaggle_folder
    root = tmp_path_factory.mktemp("engine")
    data = make_kaggle_folder(root / "data", per_class=24, size=64)
    recipe = {"models": ["efficientnet-lite0"], "image_size": 64, "lesion_size": 64, "mask_weight": 1.0, "epochs": 1,
              "batch_size": 16, "test_size": 0.0, "val_size": 0.3, "tta": True, "pretrained": False}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", "--config", str(root / "recipe.yaml"), "--data", str(data), "--out", str(root / "run"),
                 "--no-progress"]) == 0
    return data, root / "run" / "efficientnet-lite0" / "checkpoint.pth"


def test_onnx_runtime_says_what_pytorch_says_and_exports_once(shifted_lesion_model, tmp_path, monkeypatch, capsys):
    data, ckpt = shifted_lesion_model
    monkeypatch.setenv("BUSI_CACHE", str(tmp_path / "cache"))
    by_torch = run_predict(ckpt, [data], engine="torch")
    by_onnx = run_predict(ckpt, [data], engine="onnx")
    assert "preparing the model for ONNX Runtime" in capsys.readouterr().err
    assert len(list((tmp_path / "cache").glob("*.onnx"))) == 1 and not list((tmp_path / "cache").glob("*partial*"))
    assert len(by_torch) == len(by_onnx) == 72
    for a, b in zip(by_torch, by_onnx):
        assert a["path"] == b["path"] and a["predicted"] == b["predicted"]
        assert max(abs(a["probabilities"][c] - b["probabilities"][c]) for c in a["probabilities"]) <= 1e-5
        assert a["outside_training"] == b["outside_training"]  # the shift check reads the same features
        assert a["lesion"]["score"] == pytest.approx(b["lesion"]["score"], abs=1e-3)
    # the export is cached: auto takes it for a small folder now, without exporting again
    assert engine.choose("auto", 20, ckpt) == "onnx"
    again = run_predict(ckpt, [data / "benign"], engine="auto")
    assert "preparing" not in capsys.readouterr().err
    assert [r["predicted"] for r in again] == [r["predicted"] for r in by_onnx if "/benign/" in r["path"]]


def test_auto_takes_pytorch_for_a_few_images_and_names_are_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("BUSI_CACHE", str(tmp_path))
    assert engine.choose("auto", engine.AUTO_CACHED_MIN - 1) == "torch"
    assert engine.choose("torch", 10_000) == "torch"
    with pytest.raises(BusiError, match="--engine must be one of"):
        engine.choose("tensorrt", 10)
