"""busi inside the archive under load: N ultrasound images sent in one go (dcmtk's storescu) to a real Orthanc running
busi's plugin and to `busi listen`, beside `busi predict` on the same files in the same run.

    python benchmarks/archive_load.py --data ../shared/data/busbra_dev --n 500

Per path: seconds from the first image sent to the last SR there (images/s, and as a share of predict's, and of
`predict --dicom-out`'s, which writes the same SR and SEG per image), whether
every image got exactly one SR (none lost, none twice), the slowest answer of Orthanc's REST API while busi worked
(plugin), and the resident memory of the process running the model (Orthanc with the plugin, or busi listen) after
the first tenth of the images and at the end (flat: the model is loaded once, nothing piles up). Prints one JSON line
per path; the bundled model unless --checkpoint. The last of the N images is truncated: it should be one log line
("not classified") and cost nothing else. Needs Debian's orthanc, orthanc-python and dcmtk.
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

STORESCU = "/usr/bin/storescu"  # dcmtk's, as a modality's: not pynetdicom's script of the same name


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def send(port: int, calling: str, called: str, folder: Path) -> subprocess.Popen:
    return subprocess.Popen([STORESCU, "-aet", calling, "-aec", called, "+sd", "+r", "-to", "60", "127.0.0.1",
                             str(port), str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def follow(count, n: int, pid: int, timeout: float, probe=None) -> dict:
    """Poll until count() reaches n: seconds, memory after a tenth and at the end, the slowest probe() answer."""
    start, rss_early, slowest = time.perf_counter(), None, 0.0
    while (done := count()) < n and time.perf_counter() - start < timeout:
        if rss_early is None and done >= n // 10:
            rss_early = rss_mb(pid)
        if probe is not None:
            t = time.perf_counter()
            probe()
            slowest = max(slowest, time.perf_counter() - t)
        time.sleep(0.5)
    return {"seconds": round(time.perf_counter() - start, 1), "reports": done, "rss_mb_after_a_tenth": rss_early,
            "rss_mb_at_end": rss_mb(pid), **({"slowest_rest_answer_s": round(slowest, 3)} if probe else {})}


def main() -> None:
    import pydicom

    from busi.bundled import default_checkpoint
    from conftest import free_port, write_dicom  # the tests' scanner-like DICOM writer and a free loopback port
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="a folder of PNG images (masks left out)")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--engine", default="onnx", choices=("torch", "onnx"))
    ap.add_argument("--paths", nargs="+", default=["plugin", "listen"], choices=("plugin", "listen"))
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()
    checkpoint = str(args.checkpoint or default_checkpoint())
    pngs = sorted(p for p in args.data.rglob("*.png") if "_mask" not in p.name)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        uids = set()
        for i in range(args.n):  # fewer PNGs than N: used again, each time a new instance
            rgb = np.asarray(Image.open(pngs[i % len(pngs)]).convert("RGB"))
            f = write_dicom(tmp / "images" / f"{i:05d}.dcm", rgb, "MONOCHROME2", region_mm=0.1)
            if i == args.n - 1:  # one truncated image among them: one log line, the rest classified
                ds = pydicom.dcmread(f)
                ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
                ds.save_as(f)
            else:
                uids.add(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        expected = len(uids)

        def say(path: str, result: dict, cited: list[str], log: Path, sender: subprocess.Popen) -> None:
            print(json.dumps({"path": path, "images": args.n, **result,
                              "images_per_second": round(args.n / result["seconds"], 2),
                              "share_of_predict": round(predict_s / result["seconds"], 2),
                              "share_of_predict_dicom_out": round(with_dicom_s / result["seconds"], 2),
                              "each_image_one_report": sorted(cited) == sorted(uids),
                              "lost": len(uids - set(cited)), "twice": len(cited) - len(set(cited)),
                              "sender_ok": sender.returncode == 0,
                              "not_classified_lines": [line[-160:] for line in log.read_text().splitlines()
                                                       if "not classified:" in line]}), flush=True)
        busi = [sys.executable, "-m", "busi.cli"]

        start = time.perf_counter()  # the reference: predict on the same files, start-up included
        done = subprocess.run([*busi, "predict", "--checkpoint", checkpoint, "--engine", args.engine, "--no-progress",
                               str(tmp / "images")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode not in (0, 1) or done.stderr.count("busi: error:") != 1:  # 1: the truncated image, said
            raise SystemExit(f"busi predict failed: {done.stderr[-1500:]}")
        predict_s = time.perf_counter() - start
        print(json.dumps({"path": "predict", "images": args.n, "seconds": round(predict_s, 1),
                          "images_per_second": round(args.n / predict_s, 2)}), flush=True)
        # the same work as the archive paths: predict writing each image's SR and SEG too (--dicom-out)
        start = time.perf_counter()
        done = subprocess.run([*busi, "predict", "--checkpoint", checkpoint, "--engine", args.engine, "--no-progress",
                               "--dicom-out", str(tmp / "predict-dicom"), str(tmp / "images")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode not in (0, 1):
            raise SystemExit(f"busi predict --dicom-out failed: {done.stderr[-1500:]}")
        with_dicom_s = time.perf_counter() - start
        print(json.dumps({"path": "predict --dicom-out", "images": args.n, "seconds": round(with_dicom_s, 1),
                          "images_per_second": round(args.n / with_dicom_s, 2),
                          "share_of_predict": round(predict_s / with_dicom_s, 2)}), flush=True)

        if "plugin" in args.paths:
            subprocess.run([*busi, "orthanc", "--out", str(tmp / "plugin"), "--checkpoint", checkpoint, "--engine",
                            args.engine], check=True, stdout=subprocess.DEVNULL)
            http, dicom = free_port(), free_port()
            config = {"Name": "busi-load", "StorageDirectory": str(tmp / "db"), "IndexDirectory": str(tmp / "db"),
                      "HttpPort": http, "DicomServerEnabled": True, "DicomPort": dicom, "DicomAet": "ORTHANC",
                      "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
                      **json.loads((tmp / "plugin" / "busi-orthanc.json").read_text())}
            (tmp / "orthanc.json").write_text(json.dumps(config))
            base = f"http://127.0.0.1:{http}"
            with open(tmp / "orthanc.log", "w") as log:
                server = subprocess.Popen([shutil.which("Orthanc"), str(tmp / "orthanc.json")], stdout=log,
                                          stderr=subprocess.STDOUT)

            def get(path):
                with urllib.request.urlopen(f"{base}{path}", timeout=60) as r:
                    return json.loads(r.read())

            def post(path, body):
                request = urllib.request.Request(f"{base}{path}", data=json.dumps(body).encode(), method="POST")
                with urllib.request.urlopen(request, timeout=60) as r:
                    return json.loads(r.read())

            def reports():
                return post("/tools/find", {"Level": "Instance", "Query": {"Modality": "SR"}})
            try:
                while "classifying the ultrasound images" not in (tmp / "orthanc.log").read_text():
                    assert server.poll() is None, (tmp / "orthanc.log").read_text()[-2000:]
                    time.sleep(0.5)
                sender = send(dicom, "BENCH", "ORTHANC", tmp / "images")
                result = follow(lambda: len(reports()), expected, server.pid, args.timeout, lambda: get("/system"))
                sender.wait(timeout=600)
                time.sleep(3)  # long enough for a second copy, if one were coming
                cited = [get(f"/instances/{i}/tags?short")["0040,a375"][0]["0008,1115"][0]["0008,1199"][0]["0008,1155"]
                         for i in reports()]
            finally:
                server.terminate()
                server.wait(timeout=120)
            say("orthanc plugin", result, cited, tmp / "orthanc.log", sender)

        if "listen" in args.paths:
            port, out = free_port(), tmp / "listen-out"
            with open(tmp / "listen.log", "w") as log:
                node = subprocess.Popen([*busi, "listen", "--port", str(port), "--allow-ae", "BENCH", "--out", str(out),
                                         "--checkpoint", checkpoint, "--engine", args.engine],
                                        stdout=subprocess.DEVNULL, stderr=log)

            modality: dict[Path, str] = {}  # each file read once: polling must not slow the node it measures

            def sr_files():
                for f in out.glob("*.dcm"):
                    if f not in modality:
                        modality[f] = pydicom.dcmread(f, stop_before_pixels=True).Modality
                return [f for f, m in modality.items() if m == "SR"]
            try:
                while "listening on" not in (tmp / "listen.log").read_text():
                    assert node.poll() is None, (tmp / "listen.log").read_text()[-2000:]
                    time.sleep(0.5)
                sender = send(port, "BENCH", "BUSI", tmp / "images")
                result = follow(lambda: len(sr_files()), expected, node.pid, args.timeout)
                sender.wait(timeout=600)
                time.sleep(3)
                cited = [pydicom.dcmread(f).CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
                         .ReferencedSOPSequence[0].ReferencedSOPInstanceUID for f in sr_files()]
            finally:
                node.send_signal(signal.SIGTERM)
                node.wait(timeout=120)
            say("busi listen", result, cited, tmp / "listen.log", sender)

if __name__ == "__main__":
    main()
