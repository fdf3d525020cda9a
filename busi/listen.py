"""busi listen: a DICOM node modalities and archives send ultrasound images to (C-STORE); each is classified and its SR
and SEG written to a folder or stored back in the archive."""
from __future__ import annotations

import hashlib
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from .errors import BusiError
from .pacs import IMAGE_CLASSES

BATCH = 16  # images classified together when that many wait: the network is faster on batches
RETRY_SECONDS = 10  # an archive that refuses: its results stay spooled and are tried again after this long


def transfer_syntaxes() -> list[str]:
    """What scanners send and busi decodes: uncompressed, deflated, JPEG baseline and lossless, RLE, JPEG-LS, JPEG 2000."""
    from pydicom import uid
    return [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian,
            uid.ExplicitVRBigEndian, uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLossless,
            uid.JPEGLosslessSV1, uid.RLELossless, uid.JPEGLSLossless, uid.JPEGLSNearLossless, uid.JPEG2000Lossless,
            uid.JPEG2000]


def say(message: str) -> None:
    """One log line, time-stamped; never a patient's name, ID or any UID that could be traced back (hashed instead)."""
    print(f"{datetime.now():%Y-%m-%d %H:%M:%S} busi listen: {message}", file=sys.stderr, flush=True)


def hashed(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:12]


class Node:
    """The storage SCP and its worker. Every received instance is written to the spool folder before its C-STORE is
    answered, so nothing acknowledged is lost; the worker classifies what is spooled (the model loaded once), writes or
    stores its results, then removes it. A node started again finishes what the last one left in the spool."""

    def __init__(self, checkpoint_path: str | Path, spool: str | Path, out: str | Path | None = None,
                 to: str | None = None, engine: str = "auto", user: str | None = None, password: str | None = None):
        from .dicom_out import model_key
        from .inference import LoadedModel
        from .operating import describe
        self.spool = Path(spool)
        (self.spool / "failed").mkdir(parents=True, exist_ok=True)
        self.out = Path(out) if out else None
        self.archive = None
        if to:
            from .pacs import Archive
            self.archive = Archive(to, user, password)
            self.archive.probe()
        self.loaded = LoadedModel(checkpoint_path)
        self.loaded.use_engine(engine, BATCH)
        self.model, self.name = model_key(checkpoint_path), self.loaded.config["arch"]
        self.rule = describe(self.loaded.config.get("operating_point"))
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.counts = {"received": 0, "classified": 0, "failed": 0}
        self.in_flight: set[Path] = set()  # spooled files a stage holds
        self.lock = threading.Lock()
        self.retry_at = 0.0  # time.monotonic() before which nothing is sent to an archive that refused

    # the network side: runs in pynetdicom's threads, does as little as it can
    def on_store(self, event) -> int:
        sop = event.request.AffectedSOPInstanceUID
        target = self.spool / f"{time.time_ns()}-{hashed(str(sop))}.dcm"
        partial = target.with_suffix(".partial")
        partial.write_bytes(event.encoded_dataset())
        partial.rename(target)  # the worker never sees half a file
        self.counts["received"] += 1
        self.wake.set()
        return 0x0000

    @staticmethod
    def on_accepted(event) -> None:
        peer = event.assoc.requestor
        say(f"association from {peer.ae_title} at {peer.address}:{peer.port} accepted")

    @staticmethod
    def on_rejected(event) -> None:
        peer = event.assoc.requestor
        say(f"association from {peer.ae_title or '?'} at {peer.address}:{peer.port} refused (calling AE title not "
            "allowed, or nothing it offered is an ultrasound image)")

    # the work side: three stages, each in its own thread (busi.pipeline), so reading the next batch, the network on
    # this one and writing the results of the one before overlap
    def work(self) -> None:
        from .pipeline import ahead
        while not self.stopping.is_set():
            try:
                for batch in ahead(ahead(self.batches(), self.read), self.run):
                    self.deliver(batch)
            except Exception as e:  # noqa: BLE001  (nothing expected: one line, and the node goes on from the spool)
                say(f"the worker stopped ({type(e).__name__}: {str(e)[:160]}); it starts again from the spool in "
                    f"{RETRY_SECONDS} s")
                with self.lock:
                    self.in_flight.clear()
                self.stopping.wait(RETRY_SECONDS)

    def batches(self):
        """The spool's images, at most BATCH at a time, each once while it is in flight; nothing while an archive that
        refused is waited for."""
        while not self.stopping.is_set():
            if time.monotonic() < self.retry_at:
                self.stopping.wait(min(1.0, self.retry_at - time.monotonic()))
                continue
            with self.lock:  # a file delivered meanwhile is gone from the listing or still marked in flight
                batch = [f for f in sorted(self.spool.glob("*.dcm")) if f not in self.in_flight][:BATCH]
                self.in_flight.update(batch)
            if not batch:
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            yield batch

    def read(self, files: list[Path]) -> list[tuple]:
        """(file, its header, a Prepared image, 'loop' or the BusiError that stops it) per file."""
        return [(f, *self.loaded.read_dicom(f)) for f in files]

    def run(self, batch: list[tuple]) -> list[tuple]:
        """(file, header, its prediction row or BusiError): the network on the batch's images, a loop on its own."""
        rows = self.loaded.describe_each([f for f, _, _ in batch], [item for _, _, item in batch])
        return [(f, source, row) for (f, source, _), row in zip(batch, rows)]

    def deliver(self, batch: list[tuple]) -> None:
        """Each row's SR and SEG written or stored; the spooled image removed once they are. An archive that refuses:
        this batch and those behind it stay spooled and are tried again after RETRY_SECONDS."""
        from .dicom_out import results_for, write
        try:
            for f, source, row in batch:
                if time.monotonic() < self.retry_at or self.stopping.is_set():
                    return  # kept in the spool, for the retry or the next start
                try:
                    if isinstance(row, BusiError):
                        raise row
                    objects = results_for(source, row, self.model, self.name, self.rule, row.get("frame"))
                    if self.archive is not None:
                        self.archive.store(objects)
                    else:
                        write(objects, self.out)
                except BusiError as e:
                    if self.archive is not None and str(e).startswith(self.archive.url):
                        self.retry_at = time.monotonic() + RETRY_SECONDS
                        say(f"the archive refused the results ({str(e)[len(self.archive.url):].strip(': ').split(';')[0][:120]}); "
                            f"{len(list(self.spool.glob('*.dcm')))} image(s) kept in the spool, tried again in "
                            f"{RETRY_SECONDS} s")
                        return
                    self.counts["failed"] += 1
                    f.rename(self.spool / "failed" / f.name)
                    say(f"{f.name}: not classified: {str(e).replace(str(f), 'the image')[:200]}")
                    continue
                self.counts["classified"] += 1
                say(f"{f.name}: {row['predicted']} ({row['basis']['text']}); results "
                    + ("stored in the archive" if self.archive is not None else f"written to {self.out}"))
                f.unlink()
        finally:
            with self.lock:  # after the files' removal: the spool's listing never offers a removed file again
                self.in_flight.difference_update(f for f, _, _ in batch)


def listen(checkpoint_path: str | Path, port: int, allow: list[str], out: str | Path | None = None,
           to: str | None = None, host: str = "127.0.0.1", ae_title: str = "BUSI", spool: str | Path | None = None,
           engine: str = "auto", user: str | None = None, password: str | None = None,
           ready: threading.Event | None = None) -> dict:
    """Run the node until Ctrl-C or SIGTERM; -> the counts of what it received, classified and could not classify."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification
    if not allow:
        raise BusiError("busi listen needs --allow-ae TITLE: the calling AE titles of the modalities or archive that "
                        "may send (an open node would take images from anyone)")
    if (out is None) == (to is None):
        raise BusiError("busi listen needs one of --out DIR (results as files) or --to URL (stored in the archive)")
    node = Node(checkpoint_path, spool or Path(out or ".") / "spool", out, to, engine, user, password)
    ae = AE(ae_title=ae_title)
    ae.require_calling_aet = list(allow)
    ae.add_supported_context(Verification)
    for sop_class in IMAGE_CLASSES:
        ae.add_supported_context(sop_class, transfer_syntaxes())
    handlers = [(evt.EVT_C_STORE, node.on_store), (evt.EVT_ACCEPTED, node.on_accepted),
                (evt.EVT_REJECTED, node.on_rejected)]
    try:
        server = ae.start_server((host, port), block=False, evt_handlers=handlers)
    except OSError as e:
        raise BusiError(f"{host}:{port}: cannot listen there ({e.strerror or e})") from None
    worker = threading.Thread(target=node.work, name="busi-listen-worker", daemon=True)
    worker.start()
    left = len(list(node.spool.glob("*.dcm")))
    say(f"listening on {host}:{port} as {ae_title} for {', '.join(allow)}"
        + (f"; {left} image(s) left in the spool by an earlier run are classified first" if left else ""))
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if ready is not None:
        ready.set()
    try:
        while not stop.is_set():
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.shutdown()
        node.stopping.set()
        node.wake.set()
        worker.join(timeout=120)
    say(f"stopped: {node.counts['received']} received, {node.counts['classified']} classified, "
        f"{node.counts['failed']} not classified (kept in {node.spool / 'failed'}), "
        f"{len(list(node.spool.glob('*.dcm')))} left in the spool for the next start")
    return dict(node.counts)
