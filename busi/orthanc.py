"""Orthanc calls busi: a plugin for Orthanc's Python plugin that classifies each ultrasound image as Orthanc stores it
and stores its SR and SEG in the same study (busi orthanc --out DIR writes the script and its configuration)."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

from .errors import BusiError
from .pacs import IMAGE_CLASSES

PYTHON_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPython.so")  # Debian's orthanc-python
BATCH = 16
# The Orthanc global property holding the last change busi has handled (plugins' own ids start at 1024): kept in
# Orthanc's database, so a restart, a crash or a kill resumes after it and nothing stored meanwhile is missed
CURSOR = 27517
SCRIPT = '''"""busi inside Orthanc (written by `busi orthanc`): each ultrasound image Orthanc stores is classified and its
SR and SEG stored in its study. Orthanc's storage never waits: one thread follows Orthanc's change log."""
import sys

sys.path[:0] = {paths!r}  # the virtualenv busi is installed in
import orthanc  # noqa: E402  (provided by Orthanc's Python plugin)

from busi.orthanc import Link  # noqa: E402

link = Link(orthanc, {checkpoint!r}, {engine!r})
orthanc.RegisterOnChangeCallback(link.on_change)
'''


def write_plugin(out: str | Path, checkpoint: str | Path, engine: str = "auto") -> tuple[Path, Path]:
    """busi orthanc: DIR/busi_orthanc.py (the plugin script) and DIR/busi-orthanc.json (the configuration keys Orthanc
    needs to load it: merge them into the hospital's configuration, the Plugins list included)."""
    out = Path(out)
    if not PYTHON_PLUGIN.is_file():
        raise BusiError(f"{PYTHON_PLUGIN}: Orthanc's Python plugin is not installed (Debian: apt-get install "
                        "orthanc-python); busi orthanc writes a script for it")
    out.mkdir(parents=True, exist_ok=True)
    here = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], str(Path(__file__).resolve().parents[1])]
    script = out / "busi_orthanc.py"
    script.write_text(SCRIPT.format(paths=list(dict.fromkeys(here)), checkpoint=str(Path(checkpoint).resolve()),
                                    engine=engine))
    config = out / "busi-orthanc.json"
    config.write_text(json.dumps({"Plugins": [str(PYTHON_PLUGIN)], "PythonScript": str(script.resolve()),
                                  "PythonVerbose": False}, indent=2) + "\n")
    return script, config


def _key(instance: str) -> str:
    return hashlib.sha256(instance.encode()).hexdigest()[:12]


class Link:
    """What runs inside Orthanc: one worker thread loads the model once and follows Orthanc's change log from the
    last change it handled (a cursor kept in Orthanc's database); a new instance only wakes it, so Orthanc's callback
    returns at once and an instance stored while busi was not running is still classified when it next starts. It
    reads each new instance's tags, classifies the ultrasound images (anything else, busi's own results included, is
    left alone) and posts their SR and SEG back to Orthanc, under UIDs derived from the image and the model: handled
    twice after a crash, a result is the same object, and Orthanc keeps it once. A failing image is one log line, with
    a hashed key and no patient data, and the next one is classified."""

    def __init__(self, orthanc, checkpoint: str, engine: str = "auto"):
        self.orthanc, self.checkpoint, self.engine = orthanc, checkpoint, engine
        self.wake, self.stopping = threading.Event(), threading.Event()
        self.worker = threading.Thread(target=self.work, name="busi", daemon=True)
        self.counts = {"classified": 0, "failed": 0, "left_alone": 0}

    def on_change(self, change_type, level, resource) -> None:
        o = self.orthanc
        if change_type == o.ChangeType.ORTHANC_STARTED:
            self.worker.start()
        elif change_type == o.ChangeType.NEW_INSTANCE:
            self.wake.set()
        elif change_type == o.ChangeType.ORTHANC_STOPPED:
            self.stopping.set()
            self.wake.set()
            self.worker.join(timeout=60)

    def log(self, message: str) -> None:
        self.orthanc.LogWarning(f"busi: {message}")

    def get(self, uri: str) -> dict:
        return json.loads(self.orthanc.RestApiGet(uri))

    def work(self) -> None:
        from .dicom_out import model_key
        from .inference import LoadedModel
        from .operating import describe
        from .pipeline import ahead
        cursor = self.orthanc.GetGlobalProperty(CURSOR, "")
        if not cursor:  # the first start: the images stored from now on, not the archive's whole history
            cursor = str(self.get("/changes?last")["Last"])
            self.orthanc.SetGlobalProperty(CURSOR, cursor)
        cursor = int(cursor)
        try:
            self.loaded = LoadedModel(self.checkpoint)
            self.loaded.use_engine(self.engine, BATCH)
        except BusiError as e:
            self.log(f"not started: {e}")
            return
        self.model, self.name = model_key(self.checkpoint), self.loaded.config["arch"]
        self.rule = describe(self.loaded.config.get("operating_point"))
        self.log(f"classifying the ultrasound images Orthanc stores with {Path(self.checkpoint).name}, from change "
                 f"{cursor} on")
        # three stages in threads of their own (busi.pipeline): fetching and reading the next page of images, the
        # network on this one and storing the results of the one before overlap
        self.spool = Path(tempfile.mkdtemp(prefix="busi-orthanc-"))
        try:
            for page in ahead(ahead(self.pages(cursor), self.read), self.run):
                if not self.deliver(page):
                    break
        finally:
            shutil.rmtree(self.spool, ignore_errors=True)  # pages read ahead and never delivered: done next start
        self.log(f"stopped: {self.counts['classified']} classified, {self.counts['failed']} failed")

    def pages(self, cursor: int):
        """Orthanc's change log from cursor on, BATCH changes a page: (the new instances, the page's last change)."""
        while not self.stopping.is_set():
            page = self.get(f"/changes?since={cursor}&limit={BATCH}")
            if page["Last"] > cursor:
                yield [c["ID"] for c in page["Changes"] if c["ChangeType"] == "NewInstance"], page["Last"]
                cursor = page["Last"]
            if page["Done"]:
                self.wake.wait(1.0)
                self.wake.clear()

    def read(self, page: tuple) -> tuple:
        """(a temporary folder, [(instance, its file, its header, a Prepared image, 'loop' or the error)], the last
        change): the ultrasound images of the page fetched from Orthanc and cleaned; anything else left alone."""
        instances, last = page
        tmp = Path(tempfile.mkdtemp(dir=self.spool))
        entries = []
        for instance in instances:
            try:
                tags = json.loads(self.orthanc.RestApiGet(f"/instances/{instance}/tags?short"))
                if tags.get("0008,0016") not in IMAGE_CLASSES:  # a report, a segmentation (busi's own too)
                    self.counts["left_alone"] += 1
                    continue
                path = tmp / f"{_key(instance)}.dcm"
                path.write_bytes(self.orthanc.RestApiGet(f"/instances/{instance}/file"))
            except Exception as e:  # noqa: BLE001  (Orthanc's own errors: one line, and the next image)
                entries.append((instance, None, None, BusiError(f"could not be read from Orthanc ({type(e).__name__})")))
                continue
            source, item = self.loaded.read_dicom(path)
            if isinstance(item, BusiError):  # the spooled file's name means nothing to whoever reads Orthanc's log
                item = BusiError(str(item).replace(str(path), "the image"))
            entries.append((instance, path, source, item))
        return tmp, entries, last

    def run(self, page: tuple) -> tuple:
        """The same with each image's prediction row (or the error) in place of the Prepared image."""
        tmp, entries, last = page
        rows = self.loaded.describe_each([path for _, path, _, _ in entries], [item for *_, item in entries])
        return tmp, [(instance, source, BusiError(str(row).replace(str(path), "the image"))
                      if isinstance(row, BusiError) and path is not None else row)
                     for (instance, path, source, _), row in zip(entries, rows)], last

    def deliver(self, page: tuple) -> bool:
        """Each row's SR and SEG posted to Orthanc, then the cursor moved past the page (a kill before that repeats
        it, and the same results are the same objects); False once Orthanc is stopping (the page is done next start)."""
        from .dicom_out import results_for
        tmp, rows, last = page
        try:
            for instance, source, row in rows:
                if self.stopping.is_set():
                    return False
                if isinstance(row, BusiError):
                    self.fail(instance, str(row)[:200])
                    continue
                try:
                    for ds in results_for(source, row, self.model, self.name, self.rule, row.get("frame")):
                        buffer = io.BytesIO()
                        ds.save_as(buffer, enforce_file_format=True)
                        self.orthanc.RestApiPost("/instances", buffer.getvalue())
                except Exception as e:  # noqa: BLE001
                    self.fail(instance, str(e)[:200] if isinstance(e, BusiError) else f"not stored ({type(e).__name__})")
                    continue
                self.counts["classified"] += 1
                self.log(f"{_key(instance)}: {row['predicted']} ({row['basis']['text']}); SR"
                         + (" and SEG" if (row.get("lesion") or {}).get("box") else "") + " stored in its study")
            self.orthanc.SetGlobalProperty(CURSOR, str(last))
            return True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def fail(self, instance: str, why: str) -> None:
        self.counts["failed"] += 1
        self.log(f"{_key(instance)}: not classified: {why}")


def main_message(script: Path, config: Path) -> str:
    return (f"wrote {script} and {config}: merge the keys of {config.name} into Orthanc's configuration (add its "
            f"plugin to your Plugins list), restart Orthanc, and each ultrasound image it stores gets its SR and SEG "
            f"({sys.executable} is the Python whose packages the plugin uses)")
