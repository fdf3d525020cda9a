"""Orthanc calls busi: Debian's Orthanc with its Python plugin running the script `busi orthanc` writes."""
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from busi.cli import main
from busi.orthanc import PYTHON_PLUGIN
from conftest import PATIENT_ID, free_port, write_dicom

ORTHANC = shutil.which("Orthanc")


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_orthanc_classifies_each_ultrasound_image_it_stores_once_even_across_a_kill(lesion_model, tmp_path, capsys):
    if not ORTHANC or not PYTHON_PLUGIN.is_file():
        message = "needs Orthanc and its Python plugin: apt-get install orthanc orthanc-python (as .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    data, ckpt, _ = lesion_model
    assert main(["orthanc", "--out", str(tmp_path / "plugin"), "--checkpoint", str(ckpt), "--engine", "torch"]) == 0
    assert "merge the keys of busi-orthanc.json" in capsys.readouterr().out
    plugin = json.loads((tmp_path / "plugin" / "busi-orthanc.json").read_text())
    port = free_port()
    config = {"Name": "busi-test", "StorageDirectory": str(tmp_path / "db"), "IndexDirectory": str(tmp_path / "db"),
              "HttpPort": port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, **plugin}
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    base = f"http://127.0.0.1:{port}"
    with open(tmp_path / "orthanc.log", "w") as log:
        server = subprocess.Popen([ORTHANC, "--verbose", str(tmp_path / "orthanc.json")], stdout=log,
                                  stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end and "classifying the ultrasound images" not in (tmp_path / "orthanc.log").read_text():
            assert server.poll() is None, (tmp_path / "orthanc.log").read_text()[-3000:]
            time.sleep(0.5)
        images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(data.rglob("*).png"))[:4]]
        scans = [write_dicom(tmp_path / f"scan{n}.dcm", image, "MONOCHROME2", region_mm=0.2)
                 for n, image in enumerate(images)]
        broken = pydicom.dcmread(scans[0])
        broken.SOPInstanceUID = broken.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        broken.PixelData = broken.PixelData[: len(broken.PixelData) // 3]  # pixel data cut short
        broken.save_as(tmp_path / "broken.dcm")
        for f in [*scans, tmp_path / "broken.dcm"]:
            request = urllib.request.Request(f"{base}/instances", data=Path(f).read_bytes(), method="POST")
            urllib.request.urlopen(request, timeout=30).read()

        def reports():
            return [i for i in _get(f"{base}/instances?expand") if i["MainDicomTags"].get("SOPInstanceUID")
                    and _get(f"{base}/instances/{i['ID']}/tags?short")["0008,0060"] == "SR"]
        end = time.monotonic() + 180
        while time.monotonic() < end and len(reports()) < len(scans):
            assert _get(f"{base}/system")["Name"] == "busi-test"  # Orthanc answers while busi works
            time.sleep(1)
        time.sleep(3)  # long enough for a report of a report, if busi made one
        found = reports()
        cited = {_get(f"{base}/instances/{r['ID']}/tags?short")["0040,a375"][0]["0008,1115"][0]["0008,1199"][0]
                 ["0008,1155"] for r in found}
        assert len(found) == len(scans)  # one SR per image: none for the broken one, none for busi's own objects
        assert cited == {pydicom.dcmread(s, stop_before_pixels=True).SOPInstanceUID for s in scans}

        # Orthanc killed while busi is half-way through a batch, then started again: busi resumes from the last change
        # it finished (kept in Orthanc's database); what it stored before the kill is not stored twice
        more = [write_dicom(tmp_path / f"more{n}.dcm", image, "MONOCHROME2", region_mm=0.2)
                for n, image in enumerate(images)]
        stored_before = (tmp_path / "orthanc.log").read_text().count("stored in its study")
        for f in more:
            request = urllib.request.Request(f"{base}/instances", data=Path(f).read_bytes(), method="POST")
            urllib.request.urlopen(request, timeout=30).read()
        end = time.monotonic() + 180
        while time.monotonic() < end and (tmp_path / "orthanc.log").read_text().count("stored in its study") == stored_before:
            time.sleep(0.05)
        server.kill()
        server.wait(timeout=60)
        with open(tmp_path / "orthanc.log", "a") as log:
            server = subprocess.Popen([ORTHANC, "--verbose", str(tmp_path / "orthanc.json")], stdout=log,
                                      stderr=subprocess.STDOUT)
        every = {pydicom.dcmread(s, stop_before_pixels=True).SOPInstanceUID for s in [*scans, *more]}
        end = time.monotonic() + 240
        while time.monotonic() < end:
            try:
                if len(reports()) >= len(every):
                    break
            except OSError:  # not answering yet
                pass
            time.sleep(1)
        time.sleep(3)
        cited = [_get(f"{base}/instances/{r['ID']}/tags?short")["0040,a375"][0]["0008,1115"][0]["0008,1199"][0]
                 ["0008,1155"] for r in reports()]
        assert sorted(cited) == sorted(every)  # each image once: none lost to the kill, none stored twice
    finally:
        server.terminate()
        server.wait(timeout=60)
    said = [line for line in (tmp_path / "orthanc.log").read_text().splitlines() if "busi:" in line]
    assert len([line for line in said if "not classified" in line]) == 1
    assert not any(PATIENT_ID in line for line in said)
