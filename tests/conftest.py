"""Small generated datasets in the Kaggle layout, and a few real BUSI images when ../shared is beside the repo."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

BUSI_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "busi_dev"
CLASSES = ("benign", "malignant", "normal")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Every test gets its own audit cache, so no test passes because another filled it."""
    monkeypatch.setenv("BUSI_CACHE", str(tmp_path / "cache"))


def synthetic_scan(label: int, seed: int, size: int = 96) -> Image.Image:
    """A speckled grey 'scan': benign a bright round blob, malignant a dark jagged one, normal none."""
    rng = np.random.default_rng(seed)
    base = rng.normal(90, 25, (size, size)).clip(0, 255).astype(np.uint8)
    im = Image.fromarray(base).convert("RGB")
    draw = ImageDraw.Draw(im)
    cx, cy, r = rng.integers(30, size - 30), rng.integers(30, size - 30), rng.integers(10, 18)
    if label == 0:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(200, 200, 200))
    elif label == 1:
        pts = [(cx + r * np.cos(a) * rng.uniform(0.5, 1.4), cy + r * np.sin(a) * rng.uniform(0.5, 1.4))
               for a in np.linspace(0, 2 * np.pi, 12, endpoint=False)]
        draw.polygon(pts, fill=(20, 20, 20))
    return im


def make_kaggle_folder(root: Path, per_class: int = 8, size: int = 96) -> Path:
    """Dataset_BUSI_with_GT layout: '<class> (i).png' with '<class> (i)_mask.png' beside it."""
    for label, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(1, per_class + 1):
            synthetic_scan(label, seed=1000 * label + i, size=size).save(folder / f"{name} ({i}).png")
            mask = Image.new("1", (size, size), 0)
            if name != "normal":
                ImageDraw.Draw(mask).ellipse([30, 30, 60, 60], fill=1)
            mask.save(folder / f"{name} ({i})_mask.png")
    return root


@pytest.fixture
def kaggle_folder(tmp_path) -> Path:
    return make_kaggle_folder(tmp_path / "Dataset_BUSI_with_GT")


def copy_busi(dst: Path, names: dict[str, list[str]]) -> Path:
    """Copy named images (and their masks) of busi_dev into dst, in the same layout."""
    if not BUSI_DEV.is_dir():
        pytest.skip(f"{BUSI_DEV} is not here")
    for cls, files in names.items():
        (dst / cls).mkdir(parents=True, exist_ok=True)
        for f in files:
            stem = Path(f).stem
            for src in (BUSI_DEV / cls).glob(f"{glob_escape(stem)}*.png"):
                if src.stem == stem or src.stem.startswith(stem + "_mask"):
                    shutil.copy(src, dst / cls / src.name)
    return dst


def glob_escape(s: str) -> str:
    return s.replace("[", "[[]").replace("(", "[(]").replace(")", "[)]")


@pytest.fixture
def busi_few(tmp_path) -> Path:
    """Six real BUSI images per class."""
    names = {c: [f"{c} ({i}).png" for i in range(1, 7)] for c in CLASSES}
    return copy_busi(tmp_path / "busi_few", names)


LESION_RECIPE = {"models": ["efficientnet-lite0"], "image_size": 64, "lesion_size": 64, "mask_weight": 1.0, "epochs": 1,
                 "batch_size": 8, "test_size": 0.0, "val_size": 0.0, "tta": True, "pretrained": False}


@pytest.fixture(scope="session")
def lesion_model(tmp_path_factory):
    """A tiny classifier with a lesion segmenter, trained once for every test that needs one: (its data, checkpoint,
    root folder)."""
    import yaml
    from busi.cli import main
    root = tmp_path_factory.mktemp("lesion")
    data = make_kaggle_folder(root / "data", per_class=6, size=64)
    (root / "recipe.yaml").write_text(yaml.safe_dump(LESION_RECIPE))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BUSI_CACHE", str(root / "cache"))
        assert main(["train", "--config", str(root / "recipe.yaml"), "--data", str(data), "--out", str(root / "run"),
                     "--no-progress"]) == 0
    return data, root / "run" / "efficientnet-lite0" / "checkpoint.pth", root


PATIENT_NAME, PATIENT_ID, ACCESSION = "Müller^Jürgen", "PAT-123456", "ACC-998877"


def write_dicom(path, rgb: np.ndarray, photometric="RGB", syntax=None, frames=1, bits=8, patient_id=PATIENT_ID,
                region_mm=None, pixels=True, study=None):
    """A DICOM file of an HxWx3 uint8 image (greyscale photometrics take its first channel), as a scanner writes it."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (ExplicitVRLittleEndian, UltrasoundImageStorage, UltrasoundMultiFrameImageStorage,
                             generate_uid)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage if frames > 1 else UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.AccessionNumber, ds.PatientBirthDate = PATIENT_NAME, patient_id, ACCESSION, "19700101"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study or generate_uid(), generate_uid(), "US"
    ds.Manufacturer, ds.ManufacturerModelName = "Acme", "Sono 9"
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: the name's umlauts
    if region_mm:
        from pydicom.sequence import Sequence
        region = Dataset()
        region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3  # cm
        region.PhysicalDeltaX = region.PhysicalDeltaY = region_mm / 10
        ds.SequenceOfUltrasoundRegions = Sequence([region])
    if rgb.ndim == 4:  # a loop of different frames
        frames = len(rgb)
        meta.MediaStorageSOPClassUID = ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    if pixels:
        grey = photometric.startswith("MONOCHROME")
        arr = rgb[..., 0] if grey else rgb
        if bits == 16:
            arr = arr.astype(np.uint16) * 257
        if photometric == "MONOCHROME1":
            arr = (2 ** bits - 1) - arr
        if frames > 1:
            arr = arr if rgb.ndim == 4 else np.stack([arr] * frames)
            ds.NumberOfFrames = frames
        ds.Rows, ds.Columns = rgb.shape[-3:-1]
        ds.SamplesPerPixel = 1 if grey else 3
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = ds.BitsStored = bits
        ds.HighBit, ds.PixelRepresentation = bits - 1, 0
        if not grey:
            ds.PlanarConfiguration = 0
        ds.PixelData = np.ascontiguousarray(arr).tobytes()
        if syntax is not None:
            ds.compress(syntax)
    else:  # a Structured Report or key object: a DICOM file without an image
        ds.Modality = "SR"
        ds.SOPClassUID = meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.save_as(path, enforce_file_format=True)
    return path


DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, seconds: float, what: str):
    import time
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.25)
    raise AssertionError(f"waited {seconds:.0f} s for {what}")


class OrthancServer:
    """A real Orthanc with DICOMweb on a fixed loopback port and storage folder: stopped and started again as an
    archive is during maintenance, keeping what it stored."""

    def __init__(self, root):
        import json
        import os
        self.orthanc = shutil.which("Orthanc")
        if not self.orthanc or not Path(DICOMWEB_PLUGIN).is_file():
            message = "needs Orthanc and its DICOMweb plugin: apt-get install orthanc orthanc-dicomweb (.ci/run does)"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (root / "orthanc.json").write_text(json.dumps({
            "Name": "busi-outage", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
            "HttpPort": self.port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "Plugins": [DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True}}))
        self.server = None

    def start(self):
        import subprocess
        import urllib.request
        with open(self.root / "orthanc.log", "a") as log:
            self.server = subprocess.Popen([self.orthanc, str(self.root / "orthanc.json")], stdout=log,
                                           stderr=subprocess.STDOUT)

        def up():
            try:
                urllib.request.urlopen(f"{self.url}/system", timeout=1)
                return True
            except OSError:
                assert self.server.poll() is None, (self.root / "orthanc.log").read_text()[-2000:]
                return False
        wait_for(up, 60, "Orthanc")

    def stop(self):
        self.server.terminate()
        self.server.wait(timeout=60)

    def reports(self) -> list[str]:
        """The SOP Instance UID each stored SR cites, one entry per SR (a result stored twice would show twice)."""
        import json
        import urllib.request

        def get(path):
            with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as r:
                return json.loads(r.read())
        return [get(f"/instances/{i}/tags?short")["0040,a375"][0]["0008,1115"][0]["0008,1199"][0]["0008,1155"]
                for i in get("/instances") if get(f"/instances/{i}/tags?short")["0008,0060"] == "SR"]
