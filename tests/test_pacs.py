"""busi pacs against a real Orthanc (Debian's orthanc and orthanc-dicomweb, started here on a loopback port): 50
studies pulled, classified and their results stored back and read again; a run stopped midway and run again stores
nothing twice and loses nothing; a PACS that is down or refuses is one line."""
import csv
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from busi.cli import main
from busi.dicom_out import said_in
from conftest import free_port, write_dicom

ORTHANC = shutil.which("Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
N_STUDIES = 50
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"  # busi's reports (the test's own report is a Basic Text SR)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """An empty Orthanc with DICOMweb on a free loopback port: its DICOMweb root URL."""
    if not ORTHANC or not DICOMWEB_PLUGIN.is_file():
        message = "needs Orthanc and its DICOMweb plugin: apt-get install orthanc orthanc-dicomweb (as .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    root = tmp_path_factory.mktemp("orthanc")
    port = free_port()
    config = {"Name": "busi-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
              "HttpPort": port, "DicomServerEnabled": False, "DicomPort": free_port(), "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "Plugins": [str(DICOMWEB_PLUGIN)],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (root / "orthanc.json").write_text(json.dumps(config))
    with open(root / "orthanc.log", "w") as log:
        server = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{base}/system", timeout=1)
            break
        except OSError:
            if server.poll() is not None:
                pytest.fail(f"Orthanc stopped: {(root / 'orthanc.log').read_text()[-2000:]}")
            time.sleep(0.1)
    yield f"{base}/dicom-web"
    server.terminate()
    server.wait(timeout=30)


def _count(url: str, modality: str) -> dict[str, int]:
    """{study UID: how many of busi's objects of this modality it holds}, by QIDO (one image per study here)."""
    from dicomweb_client.api import DICOMwebClient
    client = DICOMwebClient(url)
    counted: dict[str, int] = {}
    for study in client.search_for_studies():
        uid = study["0020000D"]["Value"][0]
        found = [i for i in client.search_for_instances(study_instance_uid=uid, search_filters={"Modality": modality})
                 if modality != "SR" or i["00080016"]["Value"][0] == COMPREHENSIVE_3D_SR]
        if found:
            counted[uid] = len(found)
    return counted


def test_fifty_studies_classified_and_stored_back_once_even_when_stopped_midway(orthanc, lesion_model, tmp_path,
                                                                                 monkeypatch, capsys):
    import highdicom as hd
    import pydicom
    from dicomweb_client.api import DICOMwebClient
    from busi import pacs
    data, ckpt, _ = lesion_model
    pngs = sorted(data.rglob("*).png"))
    (tmp_path / "src").mkdir()
    files = [write_dicom(tmp_path / "src" / f"{n}.dcm", np.asarray(Image.open(pngs[n % len(pngs)]).convert("RGB")),
                         "MONOCHROME2", region_mm=0.2) for n in range(N_STUDIES)]  # a study each
    first_study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    write_dicom(tmp_path / "src" / "report.dcm", np.zeros((8, 8, 3), np.uint8), pixels=False,
                study=first_study)  # a report in a study: left alone
    DICOMwebClient(orthanc).store_instances([pydicom.dcmread(f) for f in tmp_path.glob("src/*.dcm")])

    # stopped after 20 images (as by Ctrl-C): what was stored stays, the run folder goes
    real_store, stored = pacs.Archive.store, []

    def store_then_stop(self, objects):
        if len(stored) == 20:
            raise KeyboardInterrupt
        real_store(self, objects)
        stored.append(objects)
    monkeypatch.setattr(pacs.Archive, "store", store_then_stop)
    assert main(["pacs", "--url", orthanc, "--checkpoint", str(ckpt), "--out", str(tmp_path / "first"),
                 "--no-progress"]) == 130
    assert not (tmp_path / "first").exists() and sum(_count(orthanc, "SR").values()) == 20
    monkeypatch.setattr(pacs.Archive, "store", real_store)

    capsys.readouterr()
    assert main(["pacs", "--url", orthanc, "--checkpoint", str(ckpt), "--out", str(tmp_path / "again"),
                 "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert f"{N_STUDIES - 20} image(s) of {N_STUDIES} studies classified" in said
    own = re.search(r"20 image\(s\) had results from this model already \((\d+) of its own results left alone\), "
                    r"1 other object\(s\) were not images", said)  # its SRs and SEGs are not 'not images'
    assert own and int(own[1]) >= 20
    with open(tmp_path / "again" / "pacs.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert {"lesion_outlined", "frame", "frames", "frames_said", "results_stored", "sr_uid", "seg_uid"} <= set(table[0])
    assert all((r["lesion_outlined"] == "yes") >= bool(r["seg_uid"]) for r in table)  # a SEG only where outlined
    reports = _count(orthanc, "SR")
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    sources = {h.SOPInstanceUID: f for h, f in zip(headers, files)}
    assert set(reports) == {h.StudyInstanceUID for h in headers} and set(reports.values()) == {1}  # once, never twice

    # read again from the archive, the results are what predict says of the same files
    assert main(["predict", "--checkpoint", str(ckpt), "--json", *map(str, sources.values())]) == 0
    rows = {r["path"]: r for r in json.loads(capsys.readouterr().out)}
    client, cited = DICOMwebClient(orthanc), []
    for study in client.search_for_studies():
        uid = study["0020000D"]["Value"][0]
        for item in client.search_for_instances(study_instance_uid=uid, search_filters={"Modality": "SR"}):
            if item["00080016"]["Value"][0] != COMPREHENSIVE_3D_SR:
                continue
            sr = hd.sr.Comprehensive3DSR.from_dataset(client.retrieve_instance(
                uid, item["0020000E"]["Value"][0], item["00080018"]["Value"][0]))
            group = sr.content.get_image_measurement_groups()[0]
            row = rows[str(sources[group.source_images[0].referenced_sop_instance_uid])]
            said = said_in(sr)
            assert said["decision"] == row["predicted"]
            assert said["probabilities"] == pytest.approx(row["probabilities"], abs=1e-5)
            regions = sr.content.get_planar_roi_measurement_groups()
            assert bool(regions) == bool(row["lesion"].get("box"))  # an outline where predict found one
            cited.append(group.source_images[0].referenced_sop_instance_uid)
    assert sorted(cited) == sorted(sources)  # each report cites its own image
    outlined = {h.StudyInstanceUID for h, f in zip(headers, files) if rows[str(f)]["lesion"].get("box")}
    assert set(_count(orthanc, "SEG")) == outlined

    # a third run: nothing left to do, nothing stored
    assert main(["pacs", "--url", orthanc, "--checkpoint", str(ckpt), "--out", str(tmp_path / "third"),
                 "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert (f"{N_STUDIES} image(s) had results from this model already ({N_STUDIES + len(outlined)} of its own results "
            "left alone), 1 other object(s) were not images") in said
    assert set(_count(orthanc, "SR").values()) == {1}
    for f in (tmp_path / "again").rglob("*"):  # the run folder names no patient
        assert b"PAT-123456" not in f.read_bytes() and "PAT-123456" not in f.name


def test_a_pacs_that_is_down_or_refuses_is_one_line(orthanc, lesion_model, tmp_path, capsys):
    _, ckpt, _ = lesion_model
    dead = f"http://127.0.0.1:{free_port()}/dicom-web"
    assert main(["pacs", "--url", dead, "--checkpoint", str(ckpt), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no DICOMweb server answers there" in err and dead in err
    assert main(["pacs", "--url", orthanc.replace("/dicom-web", "/no-such-root"), "--checkpoint", str(ckpt),
                 "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refused to search for studies (HTTP 404)" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_watcher_classifies_new_studies_as_they_arrive_and_stops_when_told(orthanc, lesion_model, tmp_path):
    """busi pacs --watch: studies sent while it runs get their results once; what was stored before is skipped."""
    import threading

    import pydicom
    from dicomweb_client.api import DICOMwebClient

    from busi.pacs import watch
    data, ckpt, _ = lesion_model
    pngs = sorted(data.rglob("*).png"))
    before = _count(orthanc, "SR")
    stop, said, done = threading.Event(), [], {}
    watcher = threading.Thread(target=lambda: done.update(watch(ckpt, orthanc, 1.0, out=tmp_path / "watch",
                                                                stop=stop, say=said.append)))
    watcher.start()
    try:
        new = [write_dicom(tmp_path / f"new{n}.dcm", np.asarray(Image.open(pngs[n]).convert("RGB")), "MONOCHROME2",
                           region_mm=0.2) for n in range(3)]
        DICOMwebClient(orthanc).store_instances([pydicom.dcmread(f) for f in new])
        studies = {pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID for f in new}
        end = time.monotonic() + 180
        while time.monotonic() < end and not studies <= set(_count(orthanc, "SR")):
            time.sleep(0.5)
    finally:
        stop.set()
        watcher.join(timeout=120)
    reports = _count(orthanc, "SR")
    assert studies <= set(reports) and all(reports[s] == 1 for s in reports)  # each new study once, none twice
    assert {s: n for s, n in reports.items() if s not in studies} == before  # the earlier ones left as they were
    assert done["classified_and_stored"] == 3 and done["failed"] == 0 and done["polls"] >= 1
    assert any("3 image(s) classified" in line or "1 image(s) classified" in line for line in said)
    with open(tmp_path / "watch" / "pacs.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 3  # one table over every poll


def test_the_watcher_rides_out_an_archive_outage(lesion_model, tmp_path):
    """busi pacs --watch while the archive is stopped and started again: the outage is a line per poll, never the end
    of the watch; studies stored before and after it each get exactly one report."""
    import threading

    import pydicom
    from dicomweb_client.api import DICOMwebClient

    from busi.pacs import watch
    from conftest import OrthancServer, wait_for
    data, ckpt, _ = lesion_model
    pngs = sorted(data.rglob("*).png"))
    (tmp_path / "orthanc").mkdir()
    archive = OrthancServer(tmp_path / "orthanc")
    archive.start()
    scans = [write_dicom(tmp_path / f"s{n}.dcm", np.asarray(Image.open(pngs[n]).convert("RGB")), "MONOCHROME2",
                         region_mm=0.2) for n in range(4)]
    stop, said, done = threading.Event(), [], {}
    watcher = threading.Thread(target=lambda: done.update(watch(ckpt, f"{archive.url}/dicom-web", 0.5,
                                                                out=tmp_path / "watch", stop=stop, say=said.append)))
    try:
        DICOMwebClient(f"{archive.url}/dicom-web").store_instances([pydicom.dcmread(f) for f in scans[:2]])
        watcher.start()
        wait_for(lambda: len(archive.reports()) == 2, 180, "the first two reports")
        archive.stop()
        wait_for(lambda: any("the archive did not answer" in line for line in said), 60, "the outage noticed")
        archive.start()
        DICOMwebClient(f"{archive.url}/dicom-web").store_instances([pydicom.dcmread(f) for f in scans[2:]])
        wait_for(lambda: len(archive.reports()) == 4, 180, "the reports after the outage")
        time.sleep(2)  # a few more polls: long enough for a second copy, if one were coming
        stored = archive.reports()
    finally:
        stop.set()
        watcher.join(timeout=120)
        archive.stop()
    assert sorted(stored) == sorted(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
                                               for f in scans)  # none lost, none twice
    assert done["archive_down"] >= 1 and done["classified_and_stored"] >= 4
