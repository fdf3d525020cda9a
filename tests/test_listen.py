"""busi listen: a DICOM node on loopback, spoken to by dcmtk's echoscu and storescu, as a modality would."""
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pydicom
import pytest
from PIL import Image

from conftest import PATIENT_ID, PATIENT_NAME, write_dicom

# dcmtk's tools, as a modality's software would be: not pynetdicom's scripts of the same names in the virtualenv
DCMTK = {tool: shutil.which(tool, path="/usr/bin:/usr/local/bin") for tool in ("echoscu", "storescu")}
pytestmark = pytest.mark.skipif(not all(DCMTK.values()), reason="needs dcmtk (storescu, echoscu; .ci/run installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(check, seconds: float, what: str):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.25)
    raise AssertionError(f"waited {seconds:.0f} s for {what}")


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
    port, out, log = _free_port(), tmp_path / "out", tmp_path / "listen.log"
    with open(log, "w") as err:
        node = subprocess.Popen([sys.executable, "-m", "busi.cli", "listen", "--port", str(port), "--allow-ae",
                                 "SCANNER", "--out", str(out), "--checkpoint", str(ckpt), "--engine", "torch"],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        _wait_for(lambda: "listening on 127.0.0.1" in log.read_text() or node.poll() is not None, 120, "the node")
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
        _wait_for(lambda: len(reports()) == len(scans) and "broken" not in str(list((out / "spool").glob("*.dcm")))
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
