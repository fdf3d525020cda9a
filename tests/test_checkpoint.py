import pickle

import pytest
import torch

from busi import checkpoint
from busi.errors import BusiError
from busi.models import build

CONFIG = {"arch": "custom-cnn", "classes": ["benign", "malignant", "normal"], "image_size": 32,
          "mean": [0.5] * 3, "std": [0.25] * 3}


def test_round_trip_with_weights_only(tmp_path):
    model = build("custom-cnn", 3)
    checkpoint.save(tmp_path / "c.pth", model, CONFIG)
    raw = torch.load(tmp_path / "c.pth", weights_only=True)  # what any user can do safely
    assert raw["config"]["classes"] == CONFIG["classes"] and raw["config"]["temperature"] == 1.0
    loaded, config = checkpoint.load(tmp_path / "c.pth")
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(loaded(x), model.eval()(x))
    assert not list(tmp_path.glob("*.tmp"))


class Evil:
    def __reduce__(self):
        return (print, ("code ran while loading",))


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"not torch"), "not a readable checkpoint"),
    (lambda p: torch.save(build("custom-cnn", 3).state_dict(), p), "not a busi checkpoint"),
    (lambda p: p.write_bytes(pickle.dumps(Evil())), "not a readable checkpoint"),
    (lambda p: torch.save({"format": "busi-checkpoint", "config": {}, "state_dict": {}}, p), "busi checkpoint is incomplete"),
])
def test_foreign_files_are_refused(tmp_path, make, message, capsys):
    make(tmp_path / "x.pth")
    with pytest.raises(BusiError, match="x.pth: " + message):
        checkpoint.load(tmp_path / "x.pth")
    assert "code ran" not in capsys.readouterr().out


def test_truncated_and_mismatched_checkpoints(tmp_path):
    checkpoint.save(tmp_path / "c.pth", build("custom-cnn", 3), CONFIG)
    data = (tmp_path / "c.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(BusiError, match="cut.pth: not a readable checkpoint"):
        checkpoint.load(tmp_path / "cut.pth")
    checkpoint.save(tmp_path / "lie.pth", build("resnet18", 3), CONFIG)  # says custom-cnn, holds resnet18
    with pytest.raises(BusiError, match="lie.pth: weights do not fit a custom-cnn"):
        checkpoint.load(tmp_path / "lie.pth")
    with pytest.raises(BusiError, match="trained for classes benign, malignant, normal"):
        checkpoint.check_classes(tmp_path / "c.pth", CONFIG, ("cyst", "solid"))
    with pytest.raises(BusiError, match="checkpoint does not exist"):
        checkpoint.load(tmp_path / "none.pth")
