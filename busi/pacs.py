"""busi pacs: the hospital's archive's breast-ultrasound images classified where they are. DICOMweb finds them
(QIDO-RS), fetches them (WADO-RS) and takes each result back into its study (STOW-RS) as a Structured Report and,
where a lesion was outlined, a Segmentation (busi.dicom_out). Results have UIDs derived from their source and the
model, so a run that is stopped and started again skips what is stored and stores nothing twice."""
from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

from .errors import BusiError

# Image storage SOP classes busi classifies (ultrasound, single and multi-frame, and secondary captures of it);
# reports, segmentations, presentation states and key objects in the same study are left alone.
IMAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.6.1": "US Image",
    "1.2.840.10008.5.1.4.1.1.3.1": "US Multi-frame Image",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image",
}
SOP_CLASS, SOP_UID, SERIES_UID, STUDY_UID = "00080016", "00080018", "0020000E", "0020000D"


def _value(item: dict, tag: str) -> str | None:
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


class Archive:
    """A PACS's DICOMweb service, every failure a one-line BusiError naming the server and what to do."""

    def __init__(self, url: str, user: str | None = None, password: str | None = None):
        from dicomweb_client.api import DICOMwebClient
        from requests import Session
        session = Session()
        if user is not None:
            session.auth = (user, password or "")
        self.url = url.rstrip("/")
        self.client = DICOMwebClient(self.url, session=session)
        # its default retries any failure five times with back-off (30 s before a refused connection is said); a run
        # that stops is started again instead, and skips what it stored
        self.client.set_http_retry_params(retry=False)

    def _call(self, what: str, fn, *args, **kwargs):
        import requests
        try:
            return fn(*args, **kwargs)
        except requests.exceptions.ConnectionError:
            raise BusiError(f"{self.url}: no DICOMweb server answers there (while trying to {what}); check --url (for "
                            "Orthanc: http://HOST:8042/dicom-web, with its DICOMweb plugin on) and that it is "
                            "running") from None
        except requests.exceptions.HTTPError as e:
            code = getattr(e.response, "status_code", "?")
            hint = " (give --user and --password)" if code in (401, 403) else ""
            raise BusiError(f"{self.url}: refused to {what} (HTTP {code}){hint}") from None

    def probe(self) -> None:
        """One small query, so that an archive that is down or refuses is said before any model is loaded."""
        self._call("search for studies", self.client.search_for_studies, limit=1)

    def studies(self, since: str | None = None) -> list[str]:
        """Study Instance UIDs of the archive's ultrasound studies (since a date, YYYYMMDD, when given)."""
        filters = {"ModalitiesInStudy": "US", **({"StudyDate": f"{since}-"} if since else {})}
        found = self._call("search for studies", self.client.search_for_studies, search_filters=filters)
        return [u for u in (_value(s, STUDY_UID) for s in found) if u]

    def instances(self, study: str) -> list[dict]:
        return self._call("list a study's images", self.client.search_for_instances, study_instance_uid=study)

    def fetch(self, study: str, series: str, sop: str):
        return self._call("fetch an image", self.client.retrieve_instance, study, series, sop)

    def store(self, objects: list) -> None:
        """One STOW-RS request for the SEG and SR of an image: stored together or, where the server says it failed,
        a one-line error."""
        answer = self._call("store results", self.client.store_instances, objects)
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            reason = failed[0].get("FailureReason", "?")
            raise BusiError(f"{self.url}: did not store {len(failed)} of busi's results (failure reason {reason})")


def run_pacs(checkpoint_path: str | Path, url: str, studies: list[str] | None = None, since: str | None = None,
             out: str | Path | None = None, overwrite: bool = False, progress: bool = True, engine: str = "auto",
             user: str | None = None, password: str | None = None, batch_size: int = 16, loaded=None,
             append: bool = False) -> tuple[dict, Path]:
    """Classify every ultrasound image of the given studies (else every ultrasound study, since a date when given) and
    store its SR and SEG back in its study. -> (summary, run folder with pacs.csv). Images whose results are stored
    already (by this model) are skipped; an image that cannot be read is a row with its error, the rest go on.
    loaded: a LoadedModel of checkpoint_path already in memory (the watcher's); append: add to the folder's pacs.csv."""
    import yaml
    from tqdm.auto import tqdm
    from . import __version__
    from .dicom import hashed
    from .dicom_out import model_key, result_uids, results_for
    from .inference import LoadedModel
    from .operating import describe
    from .runs import run_dir
    archive = Archive(url, user, password)
    wanted = list(studies or []) or archive.studies(since)
    loaded = loaded or LoadedModel(checkpoint_path)
    model, name = model_key(checkpoint_path), loaded.config["arch"]
    rule = describe(loaded.config.get("operating_point"))
    folder = run_dir(out, "pacs", overwrite)
    work = []  # (study, series, image) UIDs of every image not yet classified by this model
    skipped = {"already stored": 0, "busi's own results": 0, "not an image": 0}
    for study in wanted:
        items = archive.instances(study)
        present = {_value(i, SOP_UID) for i in items}
        # the SR and SEG this model writes for each image of the study: known by their UIDs, never classified
        own = {u for i in items for k, u in result_uids(study, _value(i, SOP_UID), model).items()
               if k in ("sr", "seg")}
        for item in items:
            if _value(item, SOP_UID) in own:
                skipped["busi's own results"] += 1
            elif _value(item, SOP_CLASS) not in IMAGE_CLASSES:
                skipped["not an image"] += 1
            elif result_uids(study, _value(item, SOP_UID), model)["sr"] in present:
                skipped["already stored"] += 1
            else:
                work.append((study, _value(item, SERIES_UID), _value(item, SOP_UID)))
    loaded.use_engine(engine, len(work))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(
        {"command": "pacs", "checkpoint": str(checkpoint_path), "url": url, "studies": len(wanted), "since": since,
         "busi_version": __version__}, sort_keys=False))
    rows = []
    fresh = not (append and (folder / "pacs.csv").is_file())
    with tempfile.TemporaryDirectory(prefix="busi-pacs-") as tmp, open(folder / "pacs.csv", "w" if fresh else "a",
                                                                        newline="") as f:
        writer = csv.writer(f)
        # image: a salted hash of its SOP Instance UID; lesion_outlined: the outline the SR carries (a loop's on its
        # answering frame); frame/frames/frames_said: a cine loop's answering frame and each class's count of frames
        if fresh:
            writer.writerow(["image", "predicted", *[f"p_{c}" for c in loaded.classes], "lesion_outlined", "frame",
                             "frames", "frames_said", "results_stored", "sr_uid", "seg_uid", "error"])
        bar = tqdm(total=len(work), desc="classifying the archive's images", disable=not progress, leave=False)
        for start in range(0, len(work), batch_size):  # fetched and classified in batches, stored one by one
            batch = [(n, *item) for n, item in enumerate(work[start:start + batch_size], start)]
            said = _classify(archive, loaded, batch, Path(tmp))
            for n, study, series, sop in batch:
                key = hashed(sop)  # the run folder names no patient, study or image
                source, row = said[n]
                try:
                    if isinstance(row, BusiError):
                        raise row
                    objects = results_for(source, row, model, name, rule, row.get("frame"))
                    archive.store(objects)
                except BusiError as e:
                    if str(e).startswith(archive.url):  # the archive itself failed: no point in going on
                        raise
                    rows.append({"image": key, "error": str(e)})
                    writer.writerow([key, "", *[""] * len(loaded.classes), "", "", "", "", "no", "", "", str(e)])
                    continue
                seg = next((o.SOPInstanceUID for o in objects if o.Modality == "SEG"), "")
                rows.append({"image": key, "predicted": row["predicted"]})
                said_frames = row.get("frames_said") or {}
                writer.writerow([key, row["predicted"], *[row["probabilities"][c] for c in loaded.classes],
                                 "yes" if (row.get("lesion") or {}).get("box") else "no", row.get("frame", ""),
                                 row.get("frames", ""), " ".join(f"{c}:{n}" for c, n in said_frames.items()),
                                 "yes", objects[-1].SOPInstanceUID, seg, ""])
                f.flush()
            bar.update(len(batch))
        bar.close()
    summary = {"studies": len(wanted), "classified_and_stored": sum("error" not in r for r in rows),
               "failed": sum("error" in r for r in rows), "skipped": skipped,
               "predicted": {c: sum(r.get("predicted") == c for r in rows) for c in loaded.classes}}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary, folder


def _classify(archive: Archive, loaded, batch: list[tuple], tmp: Path) -> dict:
    """{n: (the fetched dataset, its prediction row or the BusiError that stopped it)} for a batch of (n, study,
    series, image): still images through the network together, a cine loop frame by frame (LoadedModel.describe_loop).
    Each image lives in tmp, under a name of its own, only while it is classified."""
    fetched, prepared, said = {}, [], {}
    for n, study, series, sop in batch:
        fetched[n] = archive.fetch(study, series, sop)
        path = tmp / f"{n}.dcm"
        fetched[n].save_as(path, enforce_file_format=True)
        try:
            if loaded.is_loop(path):
                said[n] = loaded.describe_loop(path)
            else:
                prepared.append((n, loaded.prepare(path)))
        except BusiError as e:
            said[n] = e
    rows = loaded.describe([p for _, p in prepared]) if prepared else []
    said.update({n: row for (n, _), row in zip(prepared, rows)})
    for n, _, _, _ in batch:
        (tmp / f"{n}.dcm").unlink(missing_ok=True)
    return {n: (fetched[n], said[n]) for n in fetched}


def watch(checkpoint_path: str | Path, url: str, seconds: float, since: str | None = None,
          out: str | Path | None = None, overwrite: bool = False, engine: str = "auto", user: str | None = None,
          password: str | None = None, stop=None, say=print) -> dict:
    """busi pacs --watch: every `seconds`, the archive's ultrasound studies (since a date) classified as run_pacs does,
    what is stored skipped, into one run folder (pacs.csv grows); the model loaded once. An archive that is down is one
    line and tried again at the next poll; Ctrl-C, SIGTERM or stop (a threading.Event) ends it after the image in hand.
    -> totals over the polls."""
    import signal
    import threading
    from datetime import datetime

    from .inference import LoadedModel
    from .runs import run_dir
    Archive(url, user, password).probe()  # wrong URL or credentials: said now, not at the first poll
    loaded = LoadedModel(checkpoint_path)
    folder = run_dir(out, "pacs-watch", overwrite)
    stop = stop or threading.Event()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set()) if main_thread else None
    totals = {"polls": 0, "classified_and_stored": 0, "failed": 0, "archive_down": 0}
    try:
        while not stop.is_set():
            totals["polls"] += 1
            try:
                summary, _ = run_pacs(checkpoint_path, url, None, since, folder, True, False, engine, user, password,
                                      loaded=loaded, append=True)
            except BusiError as e:
                if not str(e).startswith(url.rstrip("/")):
                    raise
                totals["archive_down"] += 1
                say(f"{datetime.now():%H:%M:%S} busi pacs: the archive did not answer ({str(e)[len(url):].strip(': ').split(';')[0][:120]}); "
                    f"trying again in {seconds:g} s")
            else:
                totals["classified_and_stored"] += summary["classified_and_stored"]
                totals["failed"] += summary["failed"]
                if summary["classified_and_stored"] or summary["failed"]:
                    say(f"{datetime.now():%H:%M:%S} busi pacs: {summary['classified_and_stored']} image(s) classified "
                        f"and their results stored, {summary['failed']} failed (pacs.csv says why)")
            stop.wait(seconds)
    except KeyboardInterrupt:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    (folder / "watch.json").write_text(json.dumps(totals, indent=2))
    return {**totals, "folder": str(folder)}
