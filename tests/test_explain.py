import numpy as np
import pytest
import torch
from torch import nn

from busi.errors import BusiError
from busi.explain import gradcam, localization, overlay, summarize_localization
from busi.models import build


@pytest.mark.parametrize("arch", ["custom-cnn", "resnet18", "efficientnet-lite0"])
def test_gradcam_map_has_input_size_and_unit_range(arch):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 48, 40), dtype=torch.uint8)
    maps = gradcam(build(arch, 3), images, [0, 1, 2])
    assert maps.shape == (3, 48, 40) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1
    assert overlay(images[0].permute(1, 2, 0).numpy(), maps[0]).shape == (48, 40, 3)


@pytest.mark.parametrize("arch", ["custom-cnn", "efficientnet-lite0"])
def test_gradcam_stops_its_backward_at_the_target_layer_with_the_same_heatmaps(arch):
    """The fast path (parameters before the target layer frozen for the call) gives the heatmaps of a backward pass
    through the whole network, and leaves the model as it was: trainable where it was."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from busi.data import normalize
    from busi.models import IMAGENET_MEAN, IMAGENET_STD, last_conv_block
    torch.manual_seed(1)
    model = build(arch, 3).eval()
    next(model.parameters()).requires_grad_(False)  # a model partly frozen stays so
    trainable = [p.requires_grad for p in model.parameters()]
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    fast = gradcam(model, images, [2, 0])
    with GradCAM(model=model, target_layers=[last_conv_block(model)[0]]) as cam:  # every parameter trainable
        for p in model.parameters():
            p.requires_grad_(True)
        full = cam(input_tensor=normalize(images, IMAGENET_MEAN, IMAGENET_STD),
                   targets=[ClassifierOutputTarget(2), ClassifierOutputTarget(0)])
    assert np.abs(fast - np.nan_to_num(full).clip(0, 1)).max() < 1e-5
    for p, was in zip(model.parameters(), trainable):
        p.requires_grad_(was)
    gradcam(model, images, [1, 1])
    assert [p.requires_grad for p in model.parameters()] == trainable


def test_model_without_convolutions_gets_a_clear_message():
    flat = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    with pytest.raises(BusiError, match="no convolutional layer"):
        gradcam(flat, torch.zeros(1, 3, 8, 8, dtype=torch.uint8), [0])


def test_localization_inside_outside_and_empty():
    mask = np.zeros((20, 20), bool)
    mask[5:10, 5:10] = True
    inside = np.zeros((20, 20), np.float32)
    inside[6:9, 6:9] = 1.0
    outside = np.zeros((20, 20), np.float32)
    outside[14:18, 14:18] = 1.0
    assert localization(inside, mask) == (1.0, True)
    assert localization(outside, mask) == (0.0, False)
    assert localization(inside, np.zeros((20, 20), bool)) is None  # normal image: nothing to point at
    summary = summarize_localization(np.stack([inside, outside]), [mask, mask], [0, 1], ["benign", "malignant"],
                                     ["lesion", "lesion"])
    assert summary["per_class"]["benign"] == {"n": 1, "energy_in_lesion": 1.0, "pointing_game": 1.0}
    assert summary["per_class"]["malignant"]["energy_in_lesion"] == 0.0 and summary["energy_in_lesion"] == 0.5
    assert summary["uniform_baseline"] == 0.0625  # the 5x5 lesion covers 1/16 of the 20x20 image


def test_gradcam_of_an_ensemble_averages_its_members():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    maps = gradcam(build("custom-cnn", 3, members=2), images)
    assert maps.shape == (2, 32, 32) and maps.min() >= 0 and abs(maps.max() - 1) < 1e-5
