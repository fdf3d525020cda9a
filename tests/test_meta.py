"""Per-image facts from CSVs: a patient column named differently per source, and CSVs that match few or no images."""
import numpy as np
import pytest
from PIL import Image, ImageDraw

from busi.data import load_masks, read_mask
from busi.errors import BusiError
from busi.folders import scan, scan_sources
from busi.meta import check_columns, read_meta, source_meta


def _folder(root, names: dict[str, list[str]], suffix=".png"):
    for cls, stems in names.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for stem in stems:
            Image.new("RGB", (40, 30), (80, 80, 80)).save(root / cls / f"{stem}{suffix}")
    return root


def test_each_csv_uses_the_patient_column_it_has(tmp_path):
    a = _folder(tmp_path / "bra", {"benign": ["bus_0001-l", "bus_0001-r"], "malignant": ["bus_0002-l"]})
    b = _folder(tmp_path / "uclm", {"normal": ["ANAT_000", "ANAT_001"], "benign": ["BOAN_002"]}, ".jpg")
    (tmp_path / "bus_data.csv").write_text("ID,Case,Device\nbus_0001-l,1,GE\nbus_0001-r,1,GE\nbus_0002-l,2,GE\n")
    (tmp_path / "meta.csv").write_text("ID,Patient,Doppler\nANAT_000,ANAT,No\nANAT_001,ANAT,No\nBOAN_002,BOAN,No\n")
    ds = scan_sources([a, b])  # benign/malignant first, then a source that adds normal scans
    assert ds.classes == ("benign", "malignant", "normal")
    assert {s.path: ds.classes[s.label] for s in ds.samples}["uclm/normal/ANAT_000.jpg"] == "normal"
    files = [str(tmp_path / "bus_data.csv"), str(tmp_path / "meta.csv")]
    for f in files:
        check_columns(f, ["ID", "Case,Patient"])  # either column will do
    rows, notes = source_meta([s.path for s in ds.samples], [ds.source_of(s) for s in ds.samples], files, "ID",
                              ["Case,Patient"])
    assert {p: v["Case,Patient"] for p, v in rows.items()} == {
        "bra/benign/bus_0001-l.png": "1", "bra/benign/bus_0001-r.png": "1", "bra/malignant/bus_0002-l.png": "2",
        "uclm/normal/ANAT_000.jpg": "ANAT", "uclm/normal/ANAT_001.jpg": "ANAT", "uclm/benign/BOAN_002.jpg": "BOAN"}
    assert any("describes source uclm (3 images)" in n for n in notes)
    with pytest.raises(BusiError, match=r"meta.csv: no column\(s\) Case,Device \(it has: ID, Patient, Doppler\)"):
        check_columns(files[1], ["ID", "Case,Device"])


def test_a_csv_that_names_no_image_or_only_some_says_how_many(tmp_path):
    root = _folder(tmp_path / "d", {"benign": ["a", "b", "c"]})
    paths = [s.path for s in scan(root).samples]
    (tmp_path / "none.csv").write_text("ID,Patient\nx,1\ny,2\n")
    with pytest.raises(BusiError) as e:
        read_meta(tmp_path / "none.csv", "ID", ["Patient"], paths)
    assert "none of its 2 row(s) names an image" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "some.csv").write_text("ID,Patient\na,1\nz,2\n")
    rows, notes = read_meta(tmp_path / "some.csv", "ID", ["Patient"], paths)
    assert list(rows) == ["benign/a.png"]
    assert notes == [f"{tmp_path / 'some.csv'}: 1 row(s) name images that are not in the folder",
                     f"{tmp_path / 'some.csv'}: 2 image(s) have no row (grouped as 'unknown')"]


def test_a_jpeg_scan_with_a_colour_mask_of_two_lesions_is_read_as_the_dataset_means_it(tmp_path):
    """BUS-UCLM: JPEG images, one RGB mask each, red = malignant lesion, green = benign, several lesions per mask."""
    root = _folder(tmp_path / "uclm", {"malignant": ["CAPA_001"], "benign": ["BOAN_002"], "normal": ["ANAT_000"]},
                   ".jpg")
    red = Image.new("RGB", (40, 30), 0)
    ImageDraw.Draw(red).rectangle((2, 2, 9, 9), fill=(255, 0, 0))
    ImageDraw.Draw(red).rectangle((20, 10, 29, 19), fill=(255, 0, 0))  # a second lesion
    red.save(root / "malignant" / "CAPA_001_mask.png")
    green = Image.new("RGB", (40, 30), 0)
    ImageDraw.Draw(green).rectangle((5, 5, 14, 14), fill=(0, 255, 0))
    green.save(root / "benign" / "BOAN_002_mask.png")
    Image.new("RGB", (40, 30), 0).save(root / "normal" / "ANAT_000_mask.png")
    ds = scan(root)
    assert not ds.skipped and len(ds.samples) == 3  # masks attached, not classified
    by = {s.path.split("/")[-1]: s for s in ds.samples}
    assert read_mask([ds.file(p) for p in by["CAPA_001.jpg"].mask_paths]).sum() == 8 * 8 + 10 * 10  # both lesions
    assert read_mask([ds.file(p) for p in by["BOAN_002.jpg"].mask_paths]).sum() == 10 * 10
    masks, status = load_masks(ds, 32)
    got = dict(zip((s.path.split("/")[-1] for s in ds.samples), status))
    assert got == {"CAPA_001.jpg": "lesion", "BOAN_002.jpg": "lesion", "ANAT_000.jpg": "empty"}
    assert np.asarray(masks[[s.path.endswith("ANAT_000.jpg") for s in ds.samples]]).sum() == 0
