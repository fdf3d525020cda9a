import json

import pytest

from busi.cli import main
from busi.export import export
from busi.errors import BusiError
from busi.inference import run_predict
from test_cli import TINY


@pytest.fixture(scope="module", params=["resnet18 x2", "efficientnet-lite0"])
def ckpt(tmp_path_factory, request):
    """A two-member ensemble of tiny ResNet-18s, and EfficientNet-Lite0 from its ImageNet weights (TF 'same' padding)."""
    from conftest import make_kaggle_folder
    arch, _, members = request.param.partition(" x")
    root = tmp_path_factory.mktemp("export")
    data = make_kaggle_folder(root / "data", per_class=8, size=64)
    pretrained = arch != "resnet18"  # its ImageNet weights need a download; the Lite0 ones are installed
    # the ensemble also cleans its images (busi.preprocess, outside the graph): export and predict must still agree
    steps = "[crop, overlays]" if members else "[]"
    (root / "c.yaml").write_text(f"ensemble: {members or 1}\ntta: true\npretrained: {str(pretrained).lower()}\n"
                                 f"preprocess: {steps}\n")
    from PIL import ImageDraw
    from PIL import Image
    marked = Image.open(data / "malignant" / "malignant (1).png").convert("RGB")
    ImageDraw.Draw(marked).line([10, 20, 30, 20], fill=(255, 255, 255), width=2)  # a caliper's arm
    marked.save(data / "malignant" / "malignant (1).png")
    assert main(["train", "--data", str(data), "--model", arch, "--config", str(root / "c.yaml"), "--out",
                 str(root / "run"), *TINY]) == 0
    return root / "run" / arch / "checkpoint.pth", data


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_model_predicts_like_the_checkpoint(ckpt, fmt, tmp_path, capsys):
    path, data = ckpt
    out = tmp_path / ("model.onnx" if fmt == "onnx" else "model.pt")
    assert main(["export", "--checkpoint", str(path), "--format", fmt, "--out", str(out)]) == 0
    assert out.is_file() and not list(tmp_path.glob("*.partial*"))
    images = [data / "benign", data / "malignant" / "malignant (1).png"]
    expected = run_predict(path, images)
    got = run_predict(out, images)
    assert len(got) == len(expected) == 9
    for e, g in zip(expected, got):
        assert g["predicted"] == e["predicted"]
        assert all(abs(g["probabilities"][c] - p) < 1e-4 for c, p in e["probabilities"].items())
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(out), "--json", str(images[1])]) == 0
    assert json.loads(capsys.readouterr().out)[0]["predicted"] == expected[-1]["predicted"]


@pytest.mark.parametrize("ckpt", ["resnet18 x2"], indirect=True)
def test_export_errors(ckpt, tmp_path, capsys):
    path, data = ckpt
    assert main(["export", "--checkpoint", str(path), "--format", "tflite", "--out", str(tmp_path / "m.tflite")]) == 2
    assert "export format 'tflite' is not supported" in capsys.readouterr().err
    assert not (tmp_path / "m.tflite").exists()
    for name in ("broken.onnx", "broken.pt"):
        (tmp_path / name).write_bytes(b"\x08\x01garbage")
        with pytest.raises(BusiError, match=name + ": not a readable exported busi model"):
            run_predict(tmp_path / name, [data / "benign"])
    (tmp_path / "taken.onnx").write_bytes(b"someone's file")
    with pytest.raises(BusiError, match="already exists"):  # refused before any work, never overwritten
        export(path, "onnx", tmp_path / "taken.onnx")
    assert (tmp_path / "taken.onnx").read_bytes() == b"someone's file"
