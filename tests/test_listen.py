"""busi listen: a DICOM node on loopback, spoken to by dcmtk's echoscu and storescu, as a modality would."""
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pydicom
import pytest
from PIL import Image

from conftest import PATIENT_ID, PATIENT_NAME, OrthancServer, free_port, wait_for, write_dicom

# dcmtk's tools, as a modality's software would be: not pynetdicom's scripts of the same names in the virtualenv
DCMTK = {tool: shutil.which(tool, path="/usr/bin:/usr/local/bin") for tool in ("echoscu", "storescu")}
pytestmark = pytest.mark.skipif(not all(DCMTK.values()), reason="needs dcmtk (storescu, echoscu; .ci/run installs it)")


def _dcmtk(tool: str, port: int, calling: str, *files) -> subprocess.CompletedProcess:
    return subprocess.run([DCMTK[tool], "-aet", calling, "-aec", "BUSI", "-to", "20", "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, timeout=120)


def test_a_modality_sends_images_and_gets_a_report_for_each(lesion_model, tmp_path):
    data, ckpt, _ = lesion_model
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(data.rglob("*).png"))[:5]]
    scans = [write_dicom(tmp_path / f"scan{n}.dcm", image, "MONOCHROME2", region_mm=0.2) for n, image in
             enumerate(images)]
    broken = write_dicom(tmp_path / "broken.dcm", images[0], "MONOCHROME2")  # its pixel data cut short
    ds = pydicom.dcmread(broken)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    ds.save_as(broken)
    port, out, log = free_port(), tmp_path / "out", tmp_path / "listen.log"
    with open(log, "w") as err:
        node = subprocess.Popen([sys.executable, "-m", "busi.cli", "listen", "--port", str(port), "--allow-ae",
                                 "SCANNER", "--out", str(out), "--checkpoint", str(ckpt), "--engine", "torch"],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for(lambda: "listening on 127.0.0.1" in log.read_text() or node.poll() is not None, 120, "the node")
        assert node.poll() is None, log.read_text()
        assert _dcmtk("echoscu", port, "SCANNER").returncode == 0  # C-ECHO answered
        assert _dcmtk("echoscu", port, "STRANGER").returncode != 0  # an unknown calling AE title is refused
        sent = _dcmtk("storescu", port, "SCANNER", *scans, broken)
        assert sent.returncode == 0, sent.stderr
        # a report is not an ultrasound image: the node offers no presentation context for it, and the sender is told
        report = pydicom.dcmread(scans[0])
        report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
        report.save_as(tmp_path / "report.dcm")
        assert _dcmtk("storescu", port, "SCANNER", tmp_path / "report.dcm").returncode != 0

        def reports():
            return [f for f in out.glob("*.dcm") if pydicom.dcmread(f, stop_before_pixels=True).Modality == "SR"]
        wait_for(lambda: len(reports()) == len(scans) and "broken" not in str(list((out / "spool").glob("*.dcm")))
                  and "not classified" in log.read_text(), 180, "a report per image")
        cited = {pydicom.dcmread(f).CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
                 .ReferencedSOPSequence[0].ReferencedSOPInstanceUID for f in reports()}
        assert cited == {pydicom.dcmread(s, stop_before_pixels=True).SOPInstanceUID for s in scans}
        assert len(list((out / "spool" / "failed").glob("*.dcm"))) == 1  # the broken one, kept aside, one line
        assert not list((out / "spool").glob("*.dcm"))
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=60)
    said = log.read_text()
    assert node.returncode == 0 and "stopped: 6 received, 5 classified, 1 not classified" in said
    assert "STRANGER" in said and "refused" in said
    assert len([line for line in said.splitlines() if "not classified:" in line]) == 1
    for text in [said, *(f.name for f in out.rglob("*"))]:  # no patient name or ID in the log or any file name
        assert PATIENT_ID not in text and PATIENT_NAME.split("^")[0] not in text


def test_listen_refuses_to_start_open_or_without_a_destination(capsys):
    from busi.cli import main
    with pytest.raises(SystemExit):  # argparse: one of --out and --to is required
        main(["listen", "--port", "11112", "--allow-ae", "SCANNER"])
    assert "--out" in capsys.readouterr().err
    assert main(["listen", "--port", "11112", "--allow-ae", "A_TITLE_FAR_TOO_LONG", "--out", "x"]) == 2
    assert "1 to 16 characters" in capsys.readouterr().err



def test_results_reach_the_archive_once_through_an_outage_and_a_killed_node(lesion_model, tmp_path):
    """--to: the archive stopped while images arrive keeps them spooled until it is back; a node killed (SIGKILL) with
    undelivered results finishes them when started again; every image gets exactly one SR in the archive."""
    data, ckpt, _ = lesion_model
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(data.rglob("*).png"))[:9]]
    scans = [write_dicom(tmp_path / f"scan{n}.dcm", image, "MONOCHROME2", region_mm=0.2) for n, image in
             enumerate(images)]
    uids = [pydicom.dcmread(s, stop_before_pixels=True).SOPInstanceUID for s in scans]
    archive = OrthancServer(tmp_path)
    archive.start()
    port, spool, log = free_port(), tmp_path / "spool", tmp_path / "listen.log"

    def start_node():
        with open(log, "a") as err:
            node = subprocess.Popen([sys.executable, "-m", "busi.cli", "listen", "--port", str(port), "--allow-ae",
                                     "SCANNER", "--to", f"{archive.url}/dicom-web", "--spool", str(spool),
                                     "--checkpoint", str(ckpt), "--engine", "torch"],
                                    stdout=subprocess.DEVNULL, stderr=err)
        wait_for(lambda: log.read_text().count("listening on") == starts + 1 or node.poll() is not None, 120, "node")
        assert node.poll() is None, log.read_text()
        return node

    starts, node = 0, None
    try:
        node = start_node()
        assert _dcmtk("storescu", port, "SCANNER", *scans[:3]).returncode == 0
        wait_for(lambda: len(archive.reports()) == 3, 120, "the first results")

        archive.stop()  # maintenance: images keep arriving, their results wait in the spool
        assert _dcmtk("storescu", port, "SCANNER", *scans[3:6]).returncode == 0
        wait_for(lambda: "the archive refused" in log.read_text(), 120, "the outage noticed")
        archive.start()
        wait_for(lambda: len(archive.reports()) == 6, 120, "the results held back")

        archive.stop()  # and now the node dies with results undelivered
        assert _dcmtk("storescu", port, "SCANNER", *scans[6:]).returncode == 0
        wait_for(lambda: log.read_text().count("the archive refused") >= 2, 120, "the second outage noticed")
        node.kill()
        node.wait(timeout=30)
        assert len(list(spool.glob("*.dcm"))) == 3  # acknowledged, so kept: nothing a scanner was told is stored is lost
        archive.start()
        starts = 1
        node = start_node()
        assert "3 image(s) left in the spool by an earlier run" in log.read_text()
        wait_for(lambda: len(archive.reports()) == 9, 120, "the spooled results after the restart")
        time.sleep(2)  # long enough for a second copy, if one were coming
        stored = archive.reports()
    finally:
        if node is not None and node.poll() is None:
            node.send_signal(signal.SIGTERM)
            node.wait(timeout=60)
        if archive.server.poll() is None:
            archive.stop()
    assert sorted(stored) == sorted(uids)  # each image once: none lost, none twice
    said = log.read_text()
    assert PATIENT_ID not in said and PATIENT_NAME.split("^")[0] not in said
