import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from busi import preprocess
from busi.config import PREPROCESS_STEPS
from busi.data import augment, load_masks, read_image, scan
from conftest import make_kaggle_folder


def tissue(h=240, w=320, seed=0) -> np.ndarray:
    """Smooth speckle with a dark lesion: grey levels of a scan, nothing burned in."""
    rng = np.random.default_rng(seed)
    base = rng.normal(110, 30, (h, w)).clip(0, 255)
    base = np.asarray(Image.fromarray(base.astype(np.uint8)).resize((w // 2, h // 2)).resize((w, h), Image.BILINEAR))
    im = Image.fromarray(base).convert("RGB")
    ImageDraw.Draw(im).ellipse([120, 80, 190, 140], fill=(30, 30, 30))
    return np.array(im)


def draw_overlays(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Caliper crosses, a dotted measuring line and text, in white as scanners burn them in -> (image, where)."""
    im = Image.fromarray(image.copy())
    d = ImageDraw.Draw(im)
    for x, y in ((115, 75), (195, 145)):
        d.line([x - 6, y, x + 6, y], fill=(255, 255, 255), width=2)
        d.line([x, y - 6, x, y + 6], fill=(255, 255, 255), width=2)
    for t in range(0, 80, 6):
        d.point([(115 + t, 75 + t * 70 // 80)], fill=(255, 255, 255))
    d.text((20, 200), "LEFT BREAST 4.1cm", fill=(255, 255, 255), font=ImageFont.load_default())
    drawn = np.array(im)
    return drawn, (drawn != image).any(2)


def test_step_names_match_the_config():
    assert preprocess.STEPS == PREPROCESS_STEPS


def test_calipers_and_text_come_out():
    clean = tissue()
    marked, where = draw_overlays(clean)
    assert preprocess.overlay_mask(marked)[where].mean() > 0.7  # found (the dilation takes their rims)
    out = preprocess.remove_overlays(marked)
    assert not preprocess.overlay_mask(out).any()  # gone
    # painted from the surroundings: far closer to the scan under them than the white strokes were
    err_before = np.abs(marked[where].astype(int) - clean[where]).mean()
    err_after = np.abs(out[where].astype(int) - clean[where]).mean()
    assert err_after < 0.35 * err_before
    assert np.array_equal(out[~where & ~_near(where)], clean[~where & ~_near(where)])  # the rest untouched


def test_coloured_markers_come_out_and_grey_tissue_of_any_brightness_stays():
    clean = tissue(seed=1)
    clean[10:30, 10:30] = 250  # bright grey tissue: not a marker
    marked = clean.copy()
    marked[100:104, 40:90] = (230, 200, 20)  # a yellow measuring bar
    marked[150:160, 250:260] = (40, 90, 200)  # a blue Doppler box corner, darker than any stroke threshold
    where = (marked != clean).any(2)
    found = preprocess.overlay_mask(marked)
    assert found[where].all()
    assert not found[10:30, 10:30].any()
    assert not preprocess.overlay_mask(preprocess.remove_overlays(marked)).any()


def _near(where: np.ndarray, r: int = 6) -> np.ndarray:
    import cv2
    return cv2.dilate(where.astype(np.uint8), np.ones((2 * r + 1, 2 * r + 1), np.uint8)) > 0


def test_an_image_without_overlays_comes_out_unchanged():
    clean = tissue(seed=3)
    assert np.array_equal(preprocess.apply(clean, ["crop", "overlays"]), clean)


def test_crop_to_scan_trims_black_margins_and_the_text_on_them():
    frame = np.zeros((300, 420, 3), np.uint8)
    frame[30:270, 60:380] = tissue()
    im = Image.fromarray(frame)
    ImageDraw.Draw(im).text((5, 5), "LOGIQ E9", fill=(255, 255, 255))
    top, bottom, left, right = preprocess.scan_box(np.array(im))
    assert abs(top - 30) <= 2 and abs(bottom - 270) <= 2 and abs(left - 60) <= 2 and abs(right - 380) <= 2
    assert preprocess.apply(np.array(im), ["crop"]).shape[:2] == (bottom - top, right - left)


def test_crop_keeps_a_mostly_dark_image_whole():
    dark = np.zeros((100, 100, 3), np.uint8)
    dark[45:55, 45:55] = 200
    assert preprocess.apply(dark, ["crop"]).shape == dark.shape


def test_clahe_keeps_grey_and_size():
    out = preprocess.apply(tissue(), ["clahe"])
    assert out.shape == (240, 320, 3) and np.array_equal(out[..., 0], out[..., 1])


def test_masks_are_cropped_as_their_images(tmp_path):
    root = make_kaggle_folder(tmp_path / "d", per_class=2, size=96)
    path = root / "benign" / "benign (1).png"
    a = np.zeros((96, 128, 3), np.uint8)
    a[:, 32:] = np.array(Image.open(path).convert("RGB"))
    Image.fromarray(a).save(path)  # a black margin on the left: the crop cuts it
    mask = np.zeros((96, 128), np.uint8)
    mask[30:60, 62:92] = 255
    Image.fromarray(mask).save(root / "benign" / "benign (1)_mask.png")
    ds = scan(root)
    masks, status = load_masks(ds, 64, ["crop"])
    i = [s.path for s in ds.samples].index("benign/benign (1).png")
    ys, xs = np.nonzero(masks[i, 0].numpy())
    # the lesion sits at 30..92 of the 96 cropped columns: about 20..41 of 64
    assert status[i] == "lesion" and abs(xs.min() - 20) <= 1 and abs(xs.max() - 40) <= 1
    assert read_image(path, 64, steps=["crop"]).shape == (64, 64, 3)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_ultrasound_augmentation_keeps_range_and_grey(p):
    x = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8).expand(4, 3, 32, 32).contiguous()
    y = augment(x, flip_p=0, max_rotation=0, autocontrast_p=0, ultrasound_p=p, generator=torch.Generator().manual_seed(0))
    assert 0 <= y.min() and y.max() <= 1 and torch.equal(y[:, 0], y[:, 1])
    assert torch.equal(y, x.float() / 255) == (p == 0)


def test_the_checkpoint_carries_its_preprocessing_into_predict(tmp_path):
    from busi.cli import main
    from busi.inference import run_predict
    from test_cli import TINY
    root = make_kaggle_folder(tmp_path / "d", per_class=4, size=64)
    assert main(["train", "--data", str(root), "--model", "custom-cnn", "--preprocess", "crop", "overlays",
                 "--out", str(tmp_path / "run"), *TINY]) == 0
    ckpt = tmp_path / "run" / "custom-cnn" / "checkpoint.pth"
    assert torch.load(ckpt, weights_only=True)["config"]["preprocess"] == ["crop", "overlays"]
    marked, _ = draw_overlays(tissue(seed=5))
    Image.fromarray(marked).save(tmp_path / "marked.png")
    Image.fromarray(preprocess.apply(marked, ["crop", "overlays"])).save(tmp_path / "cleaned.png")
    a, b = run_predict(ckpt, [tmp_path / "marked.png", tmp_path / "cleaned.png"])
    assert a["probabilities"] == b["probabilities"]  # the model saw the cleaned scan, not the markers


def test_pad_keeps_proportions_and_its_mask_follows():
    image = tissue(120, 200)
    mask = np.zeros((120, 200), bool)
    mask[10:20, 50:60] = True
    out, m = preprocess.apply(image, ["pad"], mask=mask)
    assert out.shape == (200, 200, 3) and m.shape == (200, 200)
    assert np.array_equal(out[40:160], image) and not out[:40].any() and not out[160:].any()
    ys, xs = np.nonzero(m)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (50, 59, 50, 59)
    square = tissue(64, 64)
    assert np.array_equal(preprocess.apply(square, ["pad"]), square)
