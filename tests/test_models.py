import urllib.error

import pytest
import torch
import torchvision

from busi import models
from busi.errors import BusiError
from busi.models import build, count_parameters


@pytest.mark.parametrize("arch", ["custom-cnn", "resnet18", "resnet50"])
def test_build_gives_three_class_logits(arch):
    model = build(arch, 3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    assert count_parameters(model) > 0


def test_resnet50_loads_a_local_imagenet_state_dict(tmp_path):
    imagenet = torchvision.models.resnet50(weights=None)  # stands in for the real ImageNet file
    torch.nn.init.constant_(imagenet.conv1.weight, 0.125)
    torch.save(imagenet.state_dict(), tmp_path / "resnet50-imagenet.pth")
    model = build("resnet50", 3, weights=tmp_path / "resnet50-imagenet.pth")
    assert torch.all(model.conv1.weight == 0.125)
    assert model.fc.out_features == 3  # the 1000-class head is replaced, not loaded


def test_wrong_weight_files_are_refused(tmp_path):
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(BusiError, match="r18.pth: not a resnet50 state dict"):
        build("resnet50", 3, weights=tmp_path / "r18.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(BusiError, match="junk.pth: not a readable PyTorch weights file"):
        build("resnet50", 3, weights=tmp_path / "junk.pth")
    with pytest.raises(BusiError, match="weights file does not exist"):
        build("resnet50", 3, weights=tmp_path / "none.pth")
    with pytest.raises(BusiError, match="custom-cnn: has no ImageNet weights"):
        build("custom-cnn", 3, weights=tmp_path / "r18.pth")


def test_offline_download_says_both_ways_out(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(BusiError) as e:
        build("resnet50", 3, pretrained=True)
    message = str(e.value)
    assert "could not download ImageNet weights" in message and "--weights FILE" in message and "--no-pretrained" in message
    assert "\n" not in message


def test_unknown_architecture():
    with pytest.raises(BusiError, match="unknown model 'vgg'"):
        models.build("vgg", 3)


def test_ensemble_averages_member_probabilities():
    torch.manual_seed(0)
    ensemble = build("custom-cnn", 3, members=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = torch.stack([m(x).softmax(1) for m in ensemble.members]).mean(0)
        assert torch.allclose(ensemble(x).softmax(1), expected, atol=1e-6)
