import numpy as np
import pytest
import torch
from PIL import Image

from busi import data
from busi.data import augment, load, read_image, scan
from busi.errors import BusiError
from conftest import make_kaggle_folder


def test_scan_kaggle_layout_leaves_masks_out_but_attaches_them(kaggle_folder):
    (kaggle_folder / "benign" / "benign (1)_mask_1.png").write_bytes((kaggle_folder / "benign" / "benign (1)_mask.png").read_bytes())
    (kaggle_folder / "benign" / "notes.txt").write_text("stray")
    (kaggle_folder / "benign" / "benign (99)_mask.png").write_bytes(b"orphan")
    (kaggle_folder / "README.md").write_text("hello")
    ds = scan(kaggle_folder)
    assert ds.classes == ("benign", "malignant", "normal")
    assert len(ds.samples) == 24
    assert not any("_mask" in s.path for s in ds.samples)
    first = next(s for s in ds.samples if s.path == "benign/benign (1).png")
    assert first.mask_paths == ("benign/benign (1)_mask.png", "benign/benign (1)_mask_1.png")
    assert ds.skipped["benign/notes.txt"].startswith("not an image file")
    assert ds.skipped["benign/benign (99)_mask.png"] == "mask without a matching image"
    assert ds.skipped["README.md"] == "not inside a class folder"


@pytest.mark.parametrize("setup, message", [
    (lambda root: root / "nope", "does not exist"),
    (lambda root: root, "no class folders"),
])
def test_scan_bad_folders(tmp_path, setup, message):
    with pytest.raises(BusiError, match=message):
        scan(setup(tmp_path))


def test_scan_empty_class_and_missing_class(kaggle_folder):
    for f in (kaggle_folder / "normal").iterdir():
        if "_mask" not in f.name:
            f.unlink()
    with pytest.raises(BusiError, match=r"normal: class folder holds no images"):
        scan(kaggle_folder)
    with pytest.raises(BusiError, match="missing class folder"):
        scan(kaggle_folder, classes=["benign", "cancer"])


def test_read_image_any_mode(tmp_path):
    grey = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (10, 1))
    cases = {
        "grey.png": Image.fromarray(grey, "L"),
        "rgba.png": Image.fromarray(np.dstack([grey] * 3 + [np.full_like(grey, 255)]), "RGBA"),
        "palette.png": Image.fromarray(grey, "L").convert("P"),
        "sixteen.png": Image.fromarray(grey.astype(np.uint16) * 257),  # 16-bit, full range
        "photo.jpg": Image.fromarray(grey, "L").convert("RGB"),
    }
    for name, im in cases.items():
        im.save(tmp_path / name)
        arr = read_image(tmp_path / name)
        assert arr.shape == (10, 64, 3) and arr.dtype == np.uint8, name
        # every mode keeps the grey ramp: dark on the left, bright on the right
        assert arr[:, 0].mean() < 10 and arr[:, -1].mean() > 240, name
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I")
    assert read_image(tmp_path / "grey.png", size=32).shape == (32, 32, 3)


def test_read_image_rgba_transparent_becomes_black(tmp_path):
    Image.new("RGBA", (8, 8), (255, 255, 255, 0)).save(tmp_path / "clear.png")
    assert read_image(tmp_path / "clear.png").max() == 0


def test_read_image_bad_files_name_the_file(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    raw = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "text.png").write_text("not a png at all")
    for name in ("truncated.png", "text.png"):
        with pytest.raises(BusiError, match=name + ": not a readable image"):
            read_image(tmp_path / name)
    monkeypatch.setattr(data, "MAX_PIXELS", 1000)
    with pytest.raises(BusiError, match="ok.png: image too large"):
        read_image(tmp_path / "ok.png")


def test_load_skips_corrupt_images_with_a_warning(kaggle_folder, capsys):
    (kaggle_folder / "benign" / "benign (2).png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    images, labels, kept = load(scan(kaggle_folder), 32, progress=False)
    assert images.shape == (23, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist().count(0) == 7
    assert "benign (2).png" in kept.skipped["benign/benign (2).png"]
    assert "benign (2).png" in capsys.readouterr().err  # warnings go to stderr, results to stdout


def test_augment_keeps_shape_range_and_flips():
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    y = augment(x, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == torch.float32 and 0 <= y.min() and y.max() <= 1
    flipped = augment(x, flip_p=1.0, max_rotation=0, autocontrast_p=0)
    assert torch.equal(flipped, x.flip(-1).float() / 255)
    stretched = augment((x // 2 + 10).to(torch.uint8), flip_p=0, max_rotation=0, autocontrast_p=1.0)
    assert torch.allclose(stretched.amax(dim=(2, 3)), torch.ones(6, 3)) and stretched.amin() == 0


def test_mask_status_counts_every_case(kaggle_folder):
    from busi.data import load_masks
    benign = kaggle_folder / "benign"
    (benign / "benign (2)_mask.png").unlink()  # an image without a mask
    Image.new("1", (50, 50), 1).save(benign / "benign (3)_mask.png")  # a mask of another size than its image
    (benign / "benign (4)_mask.png").write_bytes(b"broken")
    masks, status = load_masks(scan(kaggle_folder), 32)
    by_path = dict(zip([s.path for s in scan(kaggle_folder).samples], status))
    assert by_path["benign/benign (1).png"] == "lesion"
    assert by_path["benign/benign (2).png"] == "missing"
    assert by_path["benign/benign (3).png"] == "size_mismatch"
    assert by_path["benign/benign (4).png"] == "unreadable"
    assert by_path["normal/normal (1).png"] == "empty"  # all-black mask: a known 'no lesion'
    assert masks.shape == (24, 1, 32, 32) and masks.dtype == torch.uint8
    assert masks[[i for i, s in enumerate(status) if s != "lesion"]].sum() == 0


def test_batches_stream_what_load_holds_and_rows_read_again_on_demand(kaggle_folder, capsys):
    from busi.data import Rows, batches, reread
    (kaggle_folder / "benign" / "benign (2).png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    images, labels, kept = load(scan(kaggle_folder), 32, progress=False)
    capsys.readouterr()
    skipped = {}
    parts = list(batches(scan(kaggle_folder), 32, batch_size=5, skipped=skipped, progress=False))
    assert all(len(p[0]) <= 5 for p in parts) and "benign/benign (2).png" in skipped
    assert capsys.readouterr().err.count("benign (2).png") == 1  # one warning, not one per batch
    assert torch.equal(torch.cat([p[0] for p in parts]), images) and torch.equal(torch.cat([p[1] for p in parts]), labels)
    again = reread(kept, 32)
    assert len(again) == len(images) and torch.equal(again[[3, 0]], images[[3, 0]])
    assert torch.equal(again[3], images[3]) and torch.equal(again[0, 1], images[0, 1])
    made = []
    rows = Rows(4, lambda idx: made.append(idx) or torch.tensor(idx))
    assert rows[[2, 1]].tolist() == [2, 1] and rows[2].item() == 2 and made == [[2, 1]]  # each row made once


def test_pointing_one_folder_too_high_gets_a_hint(kaggle_folder):
    with pytest.raises(BusiError, match="did you mean --data .*Dataset_BUSI_with_GT"):
        scan(kaggle_folder.parent)


def test_odd_images_are_named_in_a_warning_or_skipped(kaggle_folder, capsys):
    """16-bit greyscale is rescaled and said; smaller than the model input is upscaled and said; 1x1 is skipped."""
    import numpy as np
    from PIL import Image
    deep = (np.arange(96 * 96, dtype=np.uint16).reshape(96, 96) * 7)
    Image.fromarray(deep).save(kaggle_folder / "benign" / "benign (3).png")  # mode I;16
    Image.new("L", (40, 40), 90).save(kaggle_folder / "malignant" / "malignant (3).png")
    Image.new("RGB", (1, 1)).save(kaggle_folder / "normal" / "normal (3).png")
    images, labels, kept = load(scan(kaggle_folder), 64, progress=False)
    err = capsys.readouterr().err
    assert "1 image(s) 16-bit greyscale, rescaled to 8 bits: benign/benign (3).png" in err
    assert "smaller than the 64-pixel model input, upscaled: malignant/malignant (3).png" in err
    assert "too small to be a scan (1x1 pixels" in kept.skipped["normal/normal (3).png"] and len(labels) == 23
    assert images[[s.path for s in kept.samples].index("benign/benign (3).png")].max() > 200  # rescaled, not clipped


def test_scan_sources_pools_folders_each_under_its_name(tmp_path):
    from busi.folders import scan_sources
    busi = make_kaggle_folder(tmp_path / "busi", per_class=3, size=64)
    hospital = tmp_path / "hospital"
    for name in ("malignant", "benign"):  # another order, a subset of the classes
        (hospital / name).mkdir(parents=True)
        Image.new("RGB", (32, 32), 90).save(hospital / name / "x.png")
        Image.new("L", (32, 32), 0).save(hospital / name / "x_mask.png")
    ds = scan_sources([busi, hospital])
    assert ds.classes == ("benign", "malignant", "normal") and len(ds.samples) == 11
    by_path = {s.path: s for s in ds.samples}
    assert by_path["hospital/malignant/x.png"].label == 1 and by_path["hospital/benign/x.png"].label == 0
    assert by_path["hospital/benign/x.png"].mask_paths == ("hospital/benign/x_mask.png",)
    assert ds.file(by_path["hospital/benign/x.png"]) == hospital / "benign" / "x.png"
    assert ds.file("busi/normal/normal (1).png").is_file()
    assert {ds.source_of(s) for s in ds.samples} == {"busi", "hospital"}
    assert scan_sources([busi]).samples == scan(busi).samples  # one folder: paths as before


def test_scan_sources_bad_input_is_one_line(tmp_path):
    from busi.folders import scan_sources
    busi = make_kaggle_folder(tmp_path / "busi", per_class=2, size=64)
    other = tmp_path / "other" / "cats"
    other.mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(other / "a.png")
    with pytest.raises(BusiError, match="class folder.s. cats are not among the classes of"):
        scan_sources([busi, tmp_path / "other"])
    with pytest.raises(BusiError, match="given twice"):
        scan_sources([busi, busi])


def test_lesion_windows_label_lesion_free_views_normal_and_keep_lesion_views():
    from busi.data import lesion_windows
    images = torch.zeros(4, 3, 64, 64, dtype=torch.uint8)
    images[:, :, 10:20, 10:20] = 255  # the lesion, bright
    masks = torch.zeros(4, 1, 64, 64)
    masks[:, :, 10:20, 10:20] = 1
    masks[3] = -1  # no mask file: never windowed
    labels = torch.tensor([0, 1, 2, 0])
    seen = set()
    for seed in range(40):
        x, y, m = lesion_windows(images, labels, masks, 1.0, normal=2, margin=2,
                                 generator=torch.Generator().manual_seed(seed))
        for i in range(3):
            seen.add((int(labels[i]), int(y[i])))
            if y[i] == 2 and labels[i] != 2:  # called normal: no lesion pixel in view, and its mask says so
                assert x[i].max() == 0 and m[i].max() == 0
            elif labels[i] != 2:  # a lesion view keeps its label and shows the lesion
                assert y[i] == labels[i] and x[i].max() > 0.5 and m[i].max() == 1
        assert torch.equal(x[3], images[3].float() / 255) and y[3] == 0
    assert seen == {(0, 0), (0, 2), (1, 1), (1, 2), (2, 2)}  # both kinds, for both lesion classes
