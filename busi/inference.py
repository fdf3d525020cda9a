"""The one road for a trained model: load any busi model, prepare images as in training, run them in batches and say
everything the model says (probabilities, decision, lesion outline, shift flag). No Lightning imported."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint, preprocess, shift
from .data import model_input, normalize, read_image
from .folders import image_files, is_dicom_file  # noqa: F401  (image_files: where faces found it)
from .errors import BusiError
from .export import ExportedModel, is_exported
from .lesion import decision_outline, lesion_scores
from .models import IMAGENET_MEAN, IMAGENET_STD, has_segmenter
from .operating import FAMILIAR_ONLY, basis, decide, guarded

# Metrics (torchmetrics), figures (matplotlib) and the audit (OpenCV) are imported where they are used: predicting
# one image needs none of them, and they take seconds to import.


@torch.no_grad()
def outputs_of(model: nn.Module, images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD, batch_size: int = 64,
               device: torch.device | str | None = None, tta: bool = False, lesion: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(raw scores, lesion probability maps or None) for uint8 NCHW images, in batches, on the model's device, from
    one pass per image (two with tta: the image and its mirror image, averaged); returned on the CPU.

    Lesion maps (N1HW float16, at half the segmenter's input size) come from models with a segmenter (busi.models
    LesionNet), unless lesion is False; the mirrored pass's map is mirrored back before averaging.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    segments = lesion and has_segmenter(model)

    def one(x):
        if not segments:
            return model(x), None
        logits, lesion = model.forward_with_lesion(x)
        return logits, torch.sigmoid(lesion.float())

    def score(x):
        x = normalize(x.to(device), mean, std)
        logits, lesion = one(x)
        if tta:
            logits_m, lesion_m = one(x.flip(-1))
            logits = (logits + logits_m) / 2
            lesion = None if lesion is None else (lesion + lesion_m.flip(-1)) / 2
        return logits.float().cpu(), None if lesion is None else lesion.half().cpu()
    out = [score(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    model.train(was_training)
    logits = torch.cat([o[0] for o in out]) if out else torch.zeros(0)
    return logits, torch.cat([o[1] for o in out]) if segments and out else None


def logits_of(model: nn.Module, images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD, batch_size: int = 64,
              device: torch.device | str | None = None, tta: bool = False) -> torch.Tensor:
    """Raw scores for uint8 NCHW images: outputs_of without the lesion maps (which are then not computed)."""
    return outputs_of(model, images, mean, std, batch_size, device, tta, lesion=False)[0]


@dataclass
class Said:
    """Everything a model says about a batch of images, from one pass (two with its mirrored test-time pass)."""
    logits: torch.Tensor  # raw scores, before the temperature
    probs: torch.Tensor  # class probabilities, after it
    predicted: torch.Tensor  # the class its stored rule decides
    lesion_maps: torch.Tensor | None = None  # N1HW lesion probabilities (models with a segmenter)
    lesion_scores: torch.Tensor | None = None  # per image: how surely it holds a lesion (busi.lesion)
    distances: torch.Tensor | None = None  # per image: distance from the training images (busi.shift)


def run_model(model, config: dict, extras: dict, images: torch.Tensor, engine=None) -> Said:
    """The checkpoint's model on uint8 NCHW images exactly as configured (normalisation, mirrored pass, temperature,
    rule): class probabilities, decisions, lesion maps and scores, and each image's distance from the model's
    training images (None when the checkpoint has no summary). The shift check reads the unmirrored pass's features.
    engine: a busi.engine.OnnxEngine of the same checkpoint, to run the network instead of PyTorch."""
    run = lambda: outputs_of(model, images, config["mean"], config["std"], tta=bool(config.get("tta", False)))  # noqa: E731
    distances = None
    if engine is not None:
        logits, maps, feats = engine.run(images)
        if config.get("shift") and all(k in extras for k in shift.KEYS):
            distances = shift.distances(extras, config["shift"], feats)
    elif config.get("shift") and all(k in extras for k in shift.KEYS):
        with shift.capturing(model) as seen:
            logits, maps = run()
        feats = seen[0::2] if config.get("tta") else seen  # with tta each batch runs as itself, then mirrored
        feats = torch.cat(feats) if feats else None
        if feats is None or len(feats) != len(images):  # a model that calls its head otherwise: measure them on their own
            feats = shift.features(model, images, config["mean"], config["std"])
        distances = shift.distances(extras, config["shift"], feats)
    else:
        logits, maps = run()
    probs = probabilities(logits, config)
    scores = lesion_scores(maps) if maps is not None else None
    return Said(logits, probs, decide(probs, config["classes"], config.get("operating_point"),
                                      decision_scores(config, scores, distances)), maps, scores, distances)


def decision_scores(config: dict, scores: torch.Tensor | None, distances: torch.Tensor | None) -> torch.Tensor | None:
    """The lesion scores the checkpoint's rule decides on: an image the shift check flags counts as a lesion found
    where the rule says so (operating.FAMILIAR_ONLY); the scores themselves, as measured, are what rows show."""
    outside = None if distances is None or not config.get("shift") else distances > config["shift"]["threshold"]
    return guarded(scores, outside, config.get("operating_point"))


def config_of(model_path: str | Path) -> dict:
    """The config stored with a checkpoint or an exported model."""
    return ExportedModel(model_path).config if is_exported(model_path) else checkpoint.read(model_path)["config"]


def operating_point_of(model_path: str | Path) -> dict | None:
    """The decision threshold stored with a checkpoint or an exported model (None: argmax)."""
    return config_of(model_path).get("operating_point")


def probabilities(logits: torch.Tensor, config: dict) -> torch.Tensor:
    """Class probabilities of a checkpoint's raw scores, after its temperature."""
    return torch.softmax(logits / float(config.get("temperature", 1.0)), 1)


def predict_probs(model, config: dict, images: torch.Tensor) -> torch.Tensor:
    return run_model(model, config, {}, images).probs


SEVERITY = ("normal", "benign", "malignant")  # for a loop's most suspicious frame; other class names rank below


def _suspicion(row: dict) -> tuple:
    p = row["probabilities"]
    return (SEVERITY.index(row["predicted"]) if row["predicted"] in SEVERITY else -1,
            p.get("malignant", max(p.values())))


def shifted(found: dict, origin: list[int]) -> dict:
    """An outline found on the image the model saw, moved onto the file's image (which the scan crop cut it from)."""
    dy, dx = origin
    x0, y0, x1, y1 = found["box"]
    return {**found, "box": [x0 + dx, y0 + dy, x1 + dx, y1 + dy],
            "polygon": [[x + dx, y + dy] for x, y in found["polygon"]]}


@dataclass
class Prepared:
    """An image as the model gets it: the cleaned image (before resizing), where it begins in the file's image, and
    the model's input."""
    path: str
    original: np.ndarray
    origin: list
    input: torch.Tensor
    mm_per_pixel: tuple[float, float] | None = None  # (rows, columns), where a DICOM header says it
    frame: int | None = None  # the frame of a cine loop that was read (from 0)


class LoadedModel:
    """Any busi model (checkpoint.pth, or an exported .onnx/.pt), ready to use the one way every face uses it (predict,
    evaluate, the web page): images prepared exactly as in training, run, and described in the same words."""

    def __init__(self, path: str | Path):
        self.path, self.extras, self.engine = Path(path), {}, None
        if is_exported(path):
            self.exported, self.model = ExportedModel(path), None
            self.config = self.exported.config
            if (self.config.get("operating_point") or {}).get(FAMILIAR_ONLY):  # an export has no shift check
                from .data import warn
                warn(f"{path}: an exported model cannot tell scans unlike its training images; its rule calls "
                     "'normal' on the lesion score alone (the checkpoint.pth also asks that a normal scan look familiar)")
        else:
            self.exported = None
            self.model, self.config, self.extras = checkpoint.load(path, extras=True)
        self.classes = list(self.config["classes"])

    def checkpoint(self, needed_for: str):
        """(model, config, extras) of a checkpoint.pth; an exported model is a one-line error saying what needs more."""
        if self.model is None:
            raise BusiError(f"{self.path}: {needed_for} needs the checkpoint.pth, not an exported model")
        return self.model, self.config, self.extras

    def prepare(self, path: str | Path, image: np.ndarray | None = None, frame: int | None = None) -> Prepared:
        """Read and clean one file (BusiError naming it when it cannot be read); image: its frame number frame,
        decoded already (a cine loop's)."""
        origin: list = []
        original = preprocess.apply(read_image(path) if image is None else image, self.config.get("preprocess", ()),
                                    origin=origin)
        spacing = None
        if is_dicom_file(Path(path)):
            from .dicom import facts, middle_frame
            found = facts(path)
            spacing = found["mm_per_pixel"]
            if frame is None and found["frames"] > 1:  # the frame read_image took
                frame = middle_frame(found["frames"])
        return Prepared(str(path), original, origin, model_input(original, self.config["image_size"]), spacing, frame)

    def read_dicom(self, path: str | Path) -> tuple:
        """(its header without the pixels or None, a Prepared image, 'loop' or the BusiError that stops it): one DICOM
        file as the archive's faces (busi listen, the Orthanc plugin) read it, never raising."""
        import pydicom
        try:
            return pydicom.dcmread(path, stop_before_pixels=True), "loop" if self.is_loop(path) else self.prepare(path)
        except BusiError as e:
            return None, e
        except Exception as e:  # noqa: BLE001  (a file no reader expected: one line, and the next image)
            return None, BusiError(f"unreadable ({type(e).__name__})")

    def is_loop(self, path: str | Path) -> bool:
        if not is_dicom_file(Path(path)):
            return False
        from .dicom import facts
        return facts(path)["frames"] > 1

    def describe_loop(self, path: str | Path, explain: bool = False, batch_size: int = 32) -> dict:
        """A cine loop's row: every frame scored, in batches as they are decoded, and the loop answered by its most
        suspicious frame (the most severe decision, then the highest probability of malignancy), whose row it takes
        with "frame" (from 0), "frames" and how many frames said each class ("frames_said")."""
        from .dicom import frames
        from .pipeline import ahead
        said: dict[str, int] = {c: 0 for c in self.classes}
        best, n = None, 0

        def chunks():
            chunk = []
            for index, image in enumerate(frames(path)):
                chunk.append(self.prepare(path, image, index))
                if len(chunk) == batch_size:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk
        for chunk in ahead(chunks(), list):  # the next frames decoded and cleaned while these run
            for row in self.describe(chunk):
                n += 1
                said[row["predicted"]] += 1
                if best is None or _suspicion(row) > _suspicion(best):
                    best = row
        if explain:  # Grad-CAM of the frame that answers for the loop only
            from .dicom import pixels
            best = self.describe([self.prepare(path, pixels(path, best["frame"]), best["frame"])], explain=True)[0]
        return {**best, "frames": n, "frames_said": said}

    def use_engine(self, engine: str, n_images: int) -> str:
        """Run the network of a checkpoint under ONNX Runtime from now on where engine (busi.engine.choose) says so for
        n_images; returns the engine chosen."""
        from . import engine as engines
        chosen = engines.choose(engine, n_images, self.path) if self.model is not None else "exported"
        if chosen == "onnx":
            self.engine = engines.OnnxEngine(self.path, self.model, self.config)
        return chosen

    def run(self, images: torch.Tensor) -> Said:
        if self.model is not None:
            return run_model(self.model, self.config, self.extras, images, self.engine)
        probs, maps = self.exported.outputs(images)
        scores = lesion_scores(maps) if maps is not None else None
        return Said(torch.log(probs), probs, decide(probs, self.classes, self.config.get("operating_point"), scores),
                    maps, scores)

    def describe_each(self, files: list[Path], items: list) -> list:
        """Per file, with what reading it gave (a Prepared image, "loop" for a cine loop, or the BusiError that stopped
        it): its row, or that error. The images go through the network together; a loop, every frame, on its own."""
        prepared = [item for item in items if isinstance(item, Prepared)]
        said = iter(self.describe(prepared) if prepared else [])
        rows = []
        for path, item in zip(files, items):
            if isinstance(item, Prepared):
                item = next(said)
            elif isinstance(item, str):  # "loop"
                try:
                    item = self.describe_loop(path)
                except BusiError as e:
                    item = e
            rows.append(item)
        return rows

    def describe(self, prepared: list[Prepared], explain: bool = False) -> list[dict]:
        """One row per prepared image: predicted class, probabilities, the shift flag, the lesion outline and its
        measurements; with explain, 'overlay': Grad-CAM of the class said with the outline and a caption drawn on."""
        if explain:
            self.checkpoint("Grad-CAM")
        said = self.run(torch.cat([p.input for p in prepared]))
        rows = []
        for j, item in enumerate(prepared):
            k = int(said.predicted[j])
            row = {"path": item.path, "predicted": self.classes[k],
                   "probabilities": {c: round(float(p), 6) for c, p in zip(self.classes, said.probs[j])}}
            if item.frame is not None:
                row["frame"] = item.frame
            if self.config.get("operating_point"):
                row["predicted_argmax"] = self.classes[int(said.probs[j].argmax())]
            if said.distances is not None:
                row["outside_training"] = bool(said.distances[j] > self.config["shift"]["threshold"])
            score = None if said.lesion_scores is None else float(said.lesion_scores[j])
            row["basis"] = basis(said.probs[j], score, self.classes, self.config.get("operating_point"), k)
            found = None
            if said.lesion_maps is not None:
                h, w = item.original.shape[:2]
                # the outline goes with the decision: a lesion for benign or malignant, none for normal
                found = decision_outline(said.lesion_maps[j, 0].float().numpy(), h, w, self.classes[k] != "normal",
                                         item.mm_per_pixel)
                row["lesion"] = {"score": round(score, 4),
                                 **(shifted(found, item.origin) if found else {"box": None, "note": "no lesion: called normal"
                                                                               if self.classes[k] == "normal" else
                                                                               "no lesion outlined"})}
            if explain:
                from .explain import gradcam, overlay
                heat = gradcam(self.model, item.input, [k], self.config["mean"], self.config["std"])[0]
                row["overlay"] = overlay(item.original, heat, found and found["polygon"], row["basis"]["text"])
            rows.append(row)
        return rows


def run_predict(checkpoint_path: str | Path, inputs: list[str | Path], explain_dir: str | Path | None = None,
                progress: bool = False, batch_size: int = 32, engine: str = "auto") -> list[dict]:
    """One row per image (LoadedModel.describe), or the error that stopped it. Images go through the model in batches,
    the next batch read and cleaned while the network runs on this one; engine: busi.engine.choose.

    With explain_dir, a Grad-CAM overlay of the decided class, with the lesion outline, is written there per image.
    """
    from .pipeline import ahead
    loaded = LoadedModel(checkpoint_path)
    if explain_dir is not None:
        loaded.checkpoint("Grad-CAM")
        explain_dir = Path(explain_dir)
        explain_dir.mkdir(parents=True, exist_ok=True)
    files = image_files(inputs)
    loaded.use_engine(engine, len(files))

    def prepared_batch(start: int) -> list:
        out = []
        for path in files[start:start + batch_size]:
            try:
                out.append(path if loaded.is_loop(path) else loaded.prepare(path))  # a loop: scored on its own
            except BusiError as e:
                out.append({"path": str(path), "error": str(e)})
        return out

    rows: list[dict] = []
    bar = tqdm(total=len(files), desc="predicting", unit="image", disable=not progress or len(files) < 8, leave=False)
    starts = range(0, len(files), batch_size)
    # the next batch read and cleaned in a thread of its own: OpenCV and PIL release the GIL while they decode and clean
    for start, batch in zip(starts, ahead(starts, prepared_batch)):
        prepared = [item for item in batch if isinstance(item, Prepared)]
        said = iter(loaded.describe(prepared, explain=explain_dir is not None) if prepared else [])
        for n, item in enumerate(batch, start):
            if isinstance(item, Path):  # a cine loop: every frame, in batches of its own
                try:
                    row = loaded.describe_loop(item, explain_dir is not None, batch_size)
                except BusiError as e:
                    row = {"path": str(item), "error": str(e)}
            else:
                row = next(said) if isinstance(item, Prepared) else item
            if explain_dir is not None and "overlay" in row:
                target = explain_dir / f"{n:04d}-{Path(row['path']).stem}-gradcam.png"
                Image.fromarray(row.pop("overlay")).save(target)
                row["explanation"] = str(target)
            rows.append(row)
        bar.update(len(batch))
    bar.close()
    return rows
