import torch

from busi.config import make_config
from busi.models import build
from busi.train import fit, logits_of


def _data(n=24, size=32):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % 3
    masks = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    masks[labels != 2, :, 8:20, 8:20] = 1
    known = torch.arange(n) % 4 != 0  # some images have no mask file
    return images, labels, masks, known


def test_fit_with_every_recipe_option(tmp_path):
    cfg = make_config({"epochs": 2, "batch_size": 8, "optimizer": "adamw", "scheduler": "cosine", "warmup_epochs": 1,
                       "label_smoothing": 0.1, "class_weights": "balanced", "mask_weight": 0.5, "tta": True,
                       "min_scale": 0.7, "brightness": 0.1, "contrast": 0.1, "val_size": 0.2})
    images, labels, masks, known = _data()
    for arch in ("custom-cnn", "resnet18"):
        before = {k: v.clone() for k, v in build(arch, 3).state_dict().items()}
        model, history = fit(build(arch, 3), cfg, (images, labels, masks, known), tmp_path / arch,
                             val=(images[:6], labels[:6]), test=(images[:6], labels[:6]), progress=False)
        assert [r["epoch"] for r in history] == [1, 2] and "val_loss" in history[0] and "test_accuracy" in history[0]
        assert set(model.state_dict()) == set(before)  # the lesion head is not part of the saved model
        assert (tmp_path / arch / "lightning" / "best.ckpt").exists()
        out = logits_of(model, images[:4], tta=True)
        assert out.shape == (4, 3) and torch.isfinite(out).all()


def test_mixup_and_cutmix_train_on_soft_labels(tmp_path):
    from busi.train import mixer
    cfg = make_config({"epochs": 1, "batch_size": 8, "mixup_alpha": 0.4, "cutmix_alpha": 1.0, "label_smoothing": 0.1,
                       "class_weights": "balanced"})
    images, labels, _, _ = _data()
    x, y = mixer(cfg, 3)(images[:8].float() / 255, labels[:8])
    assert y.shape == (8, 3) and torch.allclose(y.sum(1), torch.ones(8))  # class probabilities, one row per image
    assert (y.max(1).values < 1).any() or not torch.equal(x, images[:8].float() / 255)  # something was mixed
    model, history = fit(build("custom-cnn", 3), cfg, (images, labels), tmp_path / "mix", progress=False, checkpoints=False)
    assert history[0]["train_loss"] == history[0]["train_loss"]  # a number, not NaN
    assert mixer(make_config({}), 3) is None


def test_tta_averages_the_mirror_image():
    model = build("custom-cnn", 3).eval()
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    both = logits_of(model, x, tta=True)
    assert torch.allclose(both, (logits_of(model, x) + logits_of(model, x.flip(-1))) / 2, atol=1e-5)


def test_dataset_moves_to_the_training_device_once():
    from types import SimpleNamespace

    from busi.train import device_tensors, train_loader
    images, labels, _, _ = _data(8)
    on_cpu = device_tensors((images, labels), SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu"))))
    assert on_cpu[0] is images  # nothing copied on the CPU
    meta = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("meta")))  # stands in for a GPU
    moved = device_tensors((images, labels), meta)
    assert all(t.device.type == "meta" for t in moved)
    batch = next(iter(train_loader(moved, 4, shuffle=False)))
    assert batch[0].device.type == "meta" and batch[0].shape == (4, 3, 32, 32)  # batches are cut on the device


def test_progress_in_a_log_is_one_line_per_epoch(tmp_path, capsys):
    """Where stdout is a file (SLURM, nohup, CI) a progress bar shows nothing; an epoch line does."""
    cfg = make_config({"epochs": 2, "batch_size": 8})
    images, labels, _, _ = _data()
    fit(build("custom-cnn", 3), cfg, (images, labels), tmp_path / "custom-cnn", val=(images[:6], labels[:6]),
        progress=True, checkpoints=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if " epoch " in line]
    assert [line.split(":")[0] for line in lines] == ["custom-cnn epoch 1/2", "custom-cnn epoch 2/2"]
    assert "train_loss" in lines[0] and "val_loss" in lines[0]


def test_a_log_hears_from_a_long_epoch(tmp_path, capsys, monkeypatch):
    """Within an epoch a line appears whenever `every` seconds have passed (30 s in use; 0 here, so every batch)."""
    import busi.train
    monkeypatch.setattr(busi.train.EpochLines.__init__, "__defaults__", (0.0,))
    cfg = make_config({"epochs": 1, "batch_size": 8})
    images, labels, _, _ = _data()
    fit(build("custom-cnn", 3), cfg, (images, labels), tmp_path / "m", progress=True, checkpoints=False)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in lines if "batch" in line] == [f"m epoch 1/1: batch {b}/3" for b in (1, 2, 3)]
