"""DICOM in: the same pixels as the PNG it was made from, whatever the encoding; the header's patient, scanner and pixel
size used; one line for a DICOM that holds no image; and no patient identifier in any output."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from busi.cli import main
from busi.data import read_image
from busi.dicom import facts, is_dicom
from busi.dicom_out import said_in
from busi.errors import BusiError
from busi.folders import scan
from conftest import ACCESSION, PATIENT_ID, PATIENT_NAME, write_dicom

@pytest.fixture
def scan_rgb():
    """A grey scan-like image (equal channels), as BUSI's PNGs are."""
    rng = np.random.default_rng(0)
    grey = (rng.random((120, 160)) * 200).astype(np.uint8)
    grey[40:80, 60:110] = 20  # a dark lesion
    return np.repeat(grey[..., None], 3, axis=2)


@pytest.mark.parametrize("photometric,syntax,bits,frames", [
    ("RGB", None, 8, 1), ("MONOCHROME2", None, 8, 1), ("MONOCHROME1", None, 8, 1), ("MONOCHROME2", None, 16, 1),
    ("MONOCHROME2", "1.2.840.10008.1.2.5", 8, 1),  # RLE lossless
    ("MONOCHROME2", "1.2.840.10008.1.2.4.90", 8, 1),  # JPEG 2000 lossless
    ("MONOCHROME2", "1.2.840.10008.1.2.4.80", 8, 1),  # JPEG-LS lossless (encoded by pyjpegls, read by pylibjpeg)
    ("MONOCHROME2", "1.2.840.10008.1.2.4.80", 16, 1),  # JPEG-LS, 16-bit
    ("RGB", "1.2.840.10008.1.2.5", 8, 3),  # a cine loop, RLE
])
def test_every_encoding_reads_to_the_pixels_it_was_made_from(tmp_path, scan_rgb, photometric, syntax, bits, frames):
    png = tmp_path / "scan.png"
    Image.fromarray(scan_rgb).save(png)
    dcm = write_dicom(tmp_path / "scan", scan_rgb, photometric, syntax, frames, bits)  # no suffix: found by content
    assert is_dicom(dcm) and not is_dicom(png)
    notes = []
    assert np.array_equal(read_image(dcm, notes=notes), read_image(png))
    if frames > 1:
        assert any("frame 1 of 3" in n for n in notes)
    if bits == 16:
        assert any("16-bit" in n for n in notes)


def test_a_lossless_jpeg_pydicom_ships_reads_as_its_rle_twin():
    """JPEG lossless (process 14), which no encoder here writes: pydicom's own file of it against its RLE twin."""
    from pydicom.data import get_testdata_file
    lossless = read_image(get_testdata_file("SC_rgb_jpeg_gdcm.dcm"))
    assert lossless.shape == (100, 100, 3) and np.array_equal(lossless, read_image(get_testdata_file("SC_rgb_rle.dcm")))


def test_jpeg_baseline_in_ybr_and_palette_colour_read_as_rgb(tmp_path, scan_rgb):
    """A scanner's lossy JPEG (YBR_FULL_422, as most write it) within JPEG's tolerance; a palette-colour image exactly."""
    import io
    from pydicom import dcmread
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit
    colour = scan_rgb.copy()
    colour[10:30, 10:60] = (200, 40, 40)  # a red marker: the colour must come back as colour
    path = write_dicom(tmp_path / "jpeg.dcm", colour, "RGB")
    ds = dcmread(path)
    buffer = io.BytesIO()
    Image.fromarray(colour).save(buffer, format="JPEG", quality=95, subsampling=2)  # 4:2:0, as PIL writes YCbCr
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.PhotometricInterpretation, ds.file_meta.TransferSyntaxUID = "YBR_FULL_422", JPEGBaseline8Bit
    ds.save_as(path, enforce_file_format=True)
    read = read_image(path).astype(int)
    assert np.abs(read - colour.astype(int)).mean() < 3 and read[20, 30, 0] > read[20, 30, 1] + 100

    palette = write_dicom(tmp_path / "palette.dcm", scan_rgb, "MONOCHROME2")
    ds = dcmread(palette)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    lut = np.arange(256, dtype=np.uint16) * 257  # grey ramp in 16-bit entries, red channel reversed
    for name, values in (("Red", lut[::-1]), ("Green", lut), ("Blue", lut)):
        setattr(ds, f"{name}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{name}PaletteColorLookupTableData", values.astype("<u2").tobytes())
        ds[f"{name}PaletteColorLookupTableDescriptor"].VR = "US"
        ds[f"{name}PaletteColorLookupTableData"].VR = "OW"
    ds.save_as(palette, enforce_file_format=True)
    read = read_image(palette)
    assert np.array_equal(read[..., 1], scan_rgb[..., 0]) and np.array_equal(read[..., 0], 255 - scan_rgb[..., 0])


def test_a_folder_of_dicoms_is_scanned_and_bad_ones_are_one_line(tmp_path, scan_rgb):
    for cls in ("benign", "malignant"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        write_dicom(tmp_path / "data" / cls / "IM0001", scan_rgb, "MONOCHROME2")
        write_dicom(tmp_path / "data" / cls / "IM0002.dcm", scan_rgb, "MONOCHROME2")
    (tmp_path / "data" / "benign" / "notes.txt").write_text("not an image")
    ds = scan(tmp_path / "data")
    assert sorted(s.path for s in ds.samples) == ["benign/IM0001", "benign/IM0002.dcm", "malignant/IM0001",
                                                  "malignant/IM0002.dcm"]
    assert "benign/notes.txt" in ds.skipped
    from busi.audit import audit, summary
    found = audit(ds, progress=False, use_cache=False)["dicom"]
    assert found == {"files": 4, "patients": 1, "scanners": {"Acme Sono 9": 4},
                     "transfer_syntaxes": {"Explicit VR Little Endian": 4}, "multi_frame": 0, "with_pixel_size": 0}
    assert "DICOM: 4 files of 1 patients" in summary(audit(ds, progress=False, use_cache=False))
    report = write_dicom(tmp_path / "report.dcm", scan_rgb, pixels=False)
    with pytest.raises(BusiError, match=r"report.dcm: a DICOM SR without pixel data"):
        read_image(report)
    whole = (tmp_path / "data" / "benign" / "IM0001").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(BusiError, match=r"cut.dcm: "):
        read_image(tmp_path / "cut.dcm")


def test_the_header_gives_patient_scanner_and_millimetres_but_never_the_identifiers(tmp_path, scan_rgb):
    a = write_dicom(tmp_path / "a.dcm", scan_rgb, "MONOCHROME2", region_mm=0.1)
    b = write_dicom(tmp_path / "b.dcm", scan_rgb, "MONOCHROME2")
    c = write_dicom(tmp_path / "c.dcm", scan_rgb, "MONOCHROME2", patient_id="OTHER-1")
    fa, fb, fc = facts(a), facts(b), facts(c)
    assert fa["patient"] == fb["patient"] != fc["patient"] and PATIENT_ID not in fa["patient"]
    assert fa["scanner"] == "Acme Sono 9" and fa["mm_per_pixel"] == pytest.approx((0.1, 0.1))
    assert fb["mm_per_pixel"] is None


def test_predict_and_evaluate_on_dicoms_write_no_identifier_anywhere(tmp_path, capsys):
    """Known identifiers (a name in UTF-8 with umlauts, the ID, the accession number) in every file's header; every
    output of predict, its overlays and an evaluate run is searched for them."""
    import pydicom
    import yaml
    from conftest import LESION_RECIPE, make_kaggle_folder
    png = make_kaggle_folder(tmp_path / "png", per_class=6, size=64)
    data = tmp_path / "dicom"
    for image in png.rglob("*).png"):
        target = data / image.parent.name / image.stem.replace(" ", "_").replace("(", "").replace(")", "")
        target.parent.mkdir(parents=True, exist_ok=True)
        write_dicom(target.with_suffix(".dcm"), np.asarray(Image.open(image).convert("RGB")), "MONOCHROME2",
                    region_mm=0.2)
        for mask in image.parent.glob(f"{image.stem}_mask*.png"):
            Image.open(mask).save(target.parent / f"{target.name}{mask.stem[len(image.stem):]}.png")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(LESION_RECIPE))
    assert main(["train", "--config", str(tmp_path / "recipe.yaml"), "--data", str(data), "--out",
                 str(tmp_path / "run"), "--no-progress"]) == 0
    ckpt = tmp_path / "run" / "efficientnet-lite0" / "checkpoint.pth"
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(ckpt), "--json", "--explain", "--out", str(tmp_path / "why"),
                 str(data)]) == 0
    printed = capsys.readouterr()
    rows = json.loads(printed.out)
    assert len(rows) == 18 and all("error" not in r for r in rows)
    outlined = [r["lesion"] for r in rows if r["lesion"].get("box")]
    assert all(lesion["width_mm"] == pytest.approx(lesion["width_px"] * 0.2, abs=0.01) for lesion in outlined)
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / "ev"),
                 "--no-progress", "--dicom-out", str(tmp_path / "to_pacs")]) == 0
    printed = printed.out + printed.err + "".join(capsys.readouterr())
    # the results meant for the archive carry their image's patient module (it files them by patient): apart
    modalities = [pydicom.dcmread(f, stop_before_pixels=True).Modality for f in (tmp_path / "to_pacs").glob("*.dcm")]
    assert modalities.count("SR") == 18
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["group_column"] == "scanner (DICOM header)" and list(metrics["per_group"]) == ["Acme Sono 9"]
    assert "patients" in metrics["malignant_vs_benign"]["ci_method"]  # the header's patients, resampled
    secrets = [PATIENT_NAME, PATIENT_ID, ACCESSION, "Müller", "19700101"]
    encodings = [s.encode(enc, "ignore") for s in secrets for enc in ("utf-8", "latin-1", "utf-16-le")]
    written = [f for folder in ("run", "why", "ev") for f in (tmp_path / folder).rglob("*") if f.is_file()]
    assert len(written) > 10
    for f in written:
        content = f.read_bytes()
        assert not any(s in content for s in encodings if s), f"{f} holds a patient identifier"
    assert not any(s in printed for s in secrets)


def test_predict_dicom_out_files_a_report_and_a_segmentation_in_the_images_study(lesion_model, tmp_path, capsys):
    """--dicom-out: per DICOM image an SR (TID 1500) saying what predict said, and a SEG of the outlined lesion that
    references the image; the same UIDs again on a rerun (a PACS keeps them once); a PNG gets a note, not a file."""
    import highdicom as hd
    import pydicom
    data, ckpt, _ = lesion_model
    images = sorted(data.rglob("*).png"))[::3]
    sources = [write_dicom(tmp_path / f"{n}.dcm", np.asarray(Image.open(p).convert("RGB")), "MONOCHROME2",
                           region_mm=0.2) for n, p in enumerate(images)]
    args = ["predict", "--checkpoint", str(ckpt), "--json", "--dicom-out", str(tmp_path / "out"),
            *map(str, sources), str(images[0])]
    assert main(args) == 0
    printed = capsys.readouterr()
    rows = {r["path"]: r for r in json.loads(printed.out)}
    assert "1 image(s) are not DICOM" in printed.err
    written = sorted((tmp_path / "out").glob("*.dcm"))
    reports = [hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(f)) for f in written
               if pydicom.dcmread(f, stop_before_pixels=True).Modality == "SR"]
    segs = [hd.seg.segread(f) for f in written if pydicom.dcmread(f, stop_before_pixels=True).Modality == "SEG"]
    assert len(reports) == len(sources) and len(segs) == sum(bool(rows[str(s)]["lesion"].get("box")) for s in sources)
    by_image = {pydicom.dcmread(s, stop_before_pixels=True).SOPInstanceUID: str(s) for s in sources}
    for sr in reports:
        group = sr.content.get_image_measurement_groups()[0]
        image_uid = group.source_images[0].referenced_sop_instance_uid
        row = rows[by_image[image_uid]]
        said = said_in(sr)
        assert said["decision"] == row["predicted"]
        assert said["probabilities"] == pytest.approx(row["probabilities"], abs=1e-5)
        measured = said["measured"]
        # the figure the decision rests on comes first, with its threshold: the SR never shows only a class
        # probability that seems to contradict its decision
        basis = row["basis"]
        assert measured[f"decided on: {basis['figure']}"] == pytest.approx(basis["value"], abs=1e-5)
        if basis["threshold"] is not None:
            assert measured[f"threshold of {basis['figure']}"] == pytest.approx(basis["threshold"], abs=1e-6)
        else:  # the most probable class: no threshold to show
            assert not any(k.startswith("threshold of") for k in measured)
        said_first = [item.TextValue for item in group[0].ContentSequence if item.ValueType == "TEXT"
                      and item.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Parameters"]
        assert said_first[1].startswith(f"decided on: {basis['figure']}")  # after the rule, before the probabilities
        assert said_first[2].startswith("probabilities: ")
        assert sr.StudyInstanceUID == pydicom.dcmread(by_image[image_uid], stop_before_pixels=True).StudyInstanceUID
    for seg in segs:
        image_uid = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
        row = rows[by_image[image_uid]]
        assert int(seg.pixel_array.sum()) == pytest.approx(row["lesion"]["area_px"], rel=0.2)
    assert main(args) == 0  # again: the same objects, not new ones
    assert sorted((tmp_path / "out").glob("*.dcm")) == written


def test_every_frame_of_a_cine_loop_is_scored_and_the_loop_answered_by_its_most_suspicious(lesion_model, tmp_path,
                                                                                         capsys):
    data, ckpt, _ = lesion_model
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(data.rglob("*).png"))[::4]]
    loop = write_dicom(tmp_path / "loop.dcm", np.stack(images), "MONOCHROME2", region_mm=0.2)
    singles = [write_dicom(tmp_path / f"frame{n}.dcm", image, "MONOCHROME2", region_mm=0.2)
               for n, image in enumerate(images)]
    assert main(["predict", "--checkpoint", str(ckpt), "--json", str(loop), *map(str, singles)]) == 0
    rows = json.loads(capsys.readouterr().out)
    row, each = rows[0], rows[1:]
    assert row["frames"] == len(images) and sum(row["frames_said"].values()) == len(images)
    assert row["frames_said"] == {c: sum(r["predicted"] == c for r in each) for c in row["frames_said"]}
    twin = each[row["frame"]]  # the frame that answers: as that image alone, and no frame more suspicious
    assert row["probabilities"] == pytest.approx(twin["probabilities"], abs=1e-5) and row["predicted"] == twin["predicted"]
    from busi.inference import _suspicion
    assert all(_suspicion(r) <= _suspicion(twin) for r in each)


def test_a_loop_trains_as_its_middle_frame_or_as_every_frame_when_told(tmp_path, capsys):
    """--cine-frames all: each frame a sample of its own, with the loop's label, a loop's frames on one side of the
    split (one patient); the default: one sample per loop."""
    from conftest import make_kaggle_folder
    png = make_kaggle_folder(tmp_path / "png", per_class=4, size=64)
    data = tmp_path / "dicom"
    for cls in ("benign", "malignant"):
        images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((png / cls).glob("*).png"))]
        for n in range(4):  # four loops of three frames, a patient each
            (data / cls).mkdir(parents=True, exist_ok=True)
            write_dicom(data / cls / f"loop{n}.dcm", np.stack([images[n], images[(n + 1) % 4], images[(n + 2) % 4]]),
                        "MONOCHROME2", patient_id=f"{cls}-{n}")
    from busi.config import make_config
    from busi.workflow import prepare
    dataset = prepare(make_config({"data": [str(data)]}), progress=False)[0]  # what train would train on
    assert len(dataset.samples) == 8 and not any("#frame=" in s.path for s in dataset.samples)
    args = ["train", "--data", str(data), "--model", "custom-cnn", "--image-size", "32", "--epochs", "1",
            "--batch-size", "8", "--val-size", "0", "--no-progress"]
    assert main([*args, "--cine-frames", "all", "--out", str(tmp_path / "all")]) == 0
    split = json.loads((tmp_path / "all" / "split.json").read_text())
    assert len(split["train"]) + len(split["test"]) == 24 and all("#frame=" in p for p in split["train"])
    loops = lambda part: {p.split("#")[0] for p in split[part]}  # noqa: E731
    assert split["test"] and not loops("train") & loops("test")  # a loop never on both sides
    assert "busi: error" not in capsys.readouterr().err


@pytest.mark.skipif(not (shutil.which("dciodvfy") and shutil.which("dsrdump")),
                    reason="needs Debian's dicom3tools and dcmtk (.ci/run installs them)")
def test_every_result_object_passes_the_standards_validator(lesion_model, tmp_path, capsys):
    """dciodvfy (the standard's IOD and module checks) finds no error in any SR or SEG busi writes, for single frames
    with and without a pixel size, colour and monochrome, and a cine loop, and no warning but the DICOMDIR's (the
    source images' own missing study date): every code is a standard one; dsrdump renders each SR with the standard
    codes of the decision."""
    import subprocess

    import pydicom

    from busi import checkpoint
    data, ckpt, _ = lesion_model
    model, config = checkpoint.load(ckpt)
    every_scan_a_lesion = {"rule": "lesion-first", "class": "malignant", "threshold": 0.5, "lesion_threshold": 0.0,
                           "target_recall": 0.9, "fitted_on_positives": 10, "fitted_where": "a test"}
    ckpt = tmp_path / "lesions.pth"  # so that every input gets its SEG as well as its SR
    checkpoint.save(ckpt, model, {**config, "operating_point": every_scan_a_lesion})
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(data.rglob("*).png"))[::2]]
    sources = [write_dicom(tmp_path / "mono_mm.dcm", images[0], "MONOCHROME2", region_mm=0.2),
               write_dicom(tmp_path / "mono.dcm", images[1], "MONOCHROME2"),
               write_dicom(tmp_path / "rgb_mm.dcm", images[2], "RGB", region_mm=0.1),
               write_dicom(tmp_path / "loop.dcm", np.stack(images[3:7]), "MONOCHROME2", region_mm=0.2)]
    sources += [write_dicom(tmp_path / f"more{n}.dcm", image, "MONOCHROME2", region_mm=0.2)
                for n, image in enumerate(images[7:])]
    assert main(["predict", "--checkpoint", str(ckpt), "--dicom-out", str(tmp_path / "out"), *map(str, sources)]) == 0
    capsys.readouterr()
    written = sorted((tmp_path / "out").glob("*.dcm"))
    kinds = [pydicom.dcmread(f, stop_before_pixels=True).Modality for f in written]
    # the loop has no Frame of Reference: its SR carries the outline, and no SEG is written (dicom_out.results_for)
    assert kinds.count("SR") == len(sources) and kinds.count("SEG") == len(sources) - 1
    for f, kind in zip(written, kinds):
        report = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True)
        lines = (report.stdout + report.stderr).splitlines()
        assert not [line for line in lines if line.startswith("Error")], (f.name, kind, lines)
        # standard codes only: no term the validator does not know, no private scheme to declare
        assert not [line for line in lines if line.startswith("Warning") and "DICOMDIR" not in line], (f.name, lines)
        if kind == "SR":
            assert "CodingSchemeIdentificationSequence" not in pydicom.dcmread(f)
            rendered = subprocess.run(["dsrdump", str(f)], capture_output=True, text=True)
            assert rendered.returncode == 0 and '(47079000,SCT,"Ultrasonography of breast")' in rendered.stdout
            assert any(f'(,,"Finding")=({code},SCT,' in rendered.stdout for code in ("17621005", "30807003", "21594007"))
    # the loop's report says how it was answered, as predict and pacs.csv do: frames scored, each class's count
    import highdicom as hd
    measured = [said_in(hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(f)))["measured"]
                for f, kind in zip(written, kinds) if kind == "SR"]
    loops = [m for m in measured if "frames scored" in m]
    assert len(loops) == 1 and loops[0]["frames scored"] == 4
    assert sum(v for k, v in loops[0].items() if k.startswith("frames called")) == 4
    assert 1 <= loops[0]["answering frame (from 1)"] <= 4
