"""A trained model made local without training: BatchNorm statistics of a new scanner's images (label-free), and the
malignant threshold re-set on a hospital's own labelled images."""
from __future__ import annotations

import copy
import json
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from . import __version__, checkpoint
from .data import normalize, warn
from .errors import BusiError
from .inference import LoadedModel, decision_scores, image_files
from .runs import run_dir

MIN_IMAGES = 16  # fewer images than this measure no scanner's statistics


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, images: torch.Tensor, mean, std, batch_size: int = 64) -> nn.Module:
    """A copy of model whose BatchNorm running means and variances are those of images (uint8 NCHW), no labels used.

    Every other weight is kept. A scanner's gain, speckle and contrast shift the statistics each BatchNorm layer
    normalises with (AdaBN, Li et al. 2016); measuring them on the new hospital's own images undoes that shift.
    Each image is seen as it is and mirrored, as test-time augmentation sees it.
    """
    if len(images) < 2:
        raise BusiError(f"adapting needs at least two images to measure their statistics (got {len(images)})")
    adapted = copy.deepcopy(model).eval()
    norms = [m for m in adapted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return adapted
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over every batch, not an exponential one
        m.train()
    device = next(adapted.parameters()).device
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))  # batches that mix classes
    for i in range(0, len(images), batch_size):
        x = normalize(images[order[i:i + batch_size]].to(device), mean, std)
        if len(x) > 1:  # a one-image batch has no variance to measure
            adapted(torch.cat([x, x.flip(-1)]))
    return adapted.eval()


def read_folder(inputs, loaded, progress: bool = False) -> tuple[torch.Tensor, list[str]]:
    """Every readable image under inputs (folders searched, masks left out) as the model sees it (LoadedModel.prepare);
    unreadable files are named and skipped. -> (uint8 NCHW images, their paths)."""
    from tqdm import tqdm

    files = image_files(inputs)
    images, paths = [], []
    for path in tqdm(files, desc="reading images", unit="image", disable=not progress or len(files) < 8, leave=False):
        try:
            images.append(loaded.prepare(path).input)
        except BusiError as e:
            warn(f"skipping {e}")
            continue
        paths.append(str(path))
    where = ", ".join(map(str, inputs))
    if not files:
        raise BusiError(f"{where}: no image files found (PNG, JPEG, BMP, TIFF or DICOM; masks are left out)")
    if not paths:
        raise BusiError(f"{where}: none of the {len(files)} image files could be read")
    return torch.cat(images), paths


def save_derived(out: Path, model: nn.Module, config: dict, extras: dict, record: dict, overwrite: bool) -> Path:
    """A new run folder holding the derived checkpoint and a JSON record of how it was made from its parent."""
    folder = run_dir(out, record["command"], overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint.save(folder / "checkpoint.pth", model, config, extras=extras)
    (folder / f"{record['command']}.json").write_text(json.dumps(record, indent=2))
    return folder


def parent_of(path: str | Path, config: dict) -> dict:
    """What a derived checkpoint records of the one it was made from."""
    return {"checkpoint": str(path), "arch": config["arch"], "trained_at": config.get("trained_at"),
            "parent": config.get("parent")}


def run_adapt(checkpoint_path: str | Path, data, out: str | Path | None = None, overwrite: bool = False,
              progress: bool = False) -> tuple[dict, Path]:
    """busi adapt: the checkpoint with its BatchNorm statistics measured on the images of data (labels, if any, unused).

    The shift summary is left out of the new checkpoint: it describes the parent's features, which adapting changes.
    The operating point is the parent's threshold for adapted models where it has one (the bundled model: fitted on
    hospital-out predictions after adaptation), else the parent's own; re-set it with run_calibrate on labelled images
    of the same hospital."""
    loaded = LoadedModel(checkpoint_path)
    model, config, extras = loaded.checkpoint("busi adapt")
    inputs = data if isinstance(data, (list, tuple)) else [data]
    images, paths = read_folder(inputs, loaded, progress)
    if len(paths) < MIN_IMAGES:
        raise BusiError(f"{', '.join(map(str, inputs))}: {len(paths)} readable image(s); adapting needs at least "
                        f"{MIN_IMAGES} of the new scanner's images")
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise BusiError(f"{checkpoint_path}: a {config['arch']} has no BatchNorm layers to adapt")
    adapted = adapt_batchnorm(model, images, config["mean"], config["std"])
    record = {"command": "adapt", "method": "BatchNorm running statistics re-estimated on the images (AdaBN); no "
                                            "labels used, every weight kept", "data": [str(d) for d in inputs],
              "n_images": len(paths), "at": datetime.now().isoformat(timespec="seconds"), "busi_version": __version__,
              "parent": parent_of(checkpoint_path, config)}
    after = config.get("operating_point_after_adapt")
    config = {k: v for k, v in config.items() if k not in ("shift", "operating_point_after_adapt")}
    if after:
        config["operating_point"] = after  # fitted on adapted models' predictions at hospitals they never saw
        record["operating_point"] = "the parent's threshold for adapted models (operating_point_after_adapt)"
    config["parent"] = record["parent"]
    config["adapted"] = {k: record[k] for k in ("method", "data", "n_images", "at")}
    extras = {k: v for k, v in extras.items() if not k.startswith("shift.")}
    return record, save_derived(out, adapted, config, extras, record, overwrite)


def lesion_rule_here(said, labels: torch.Tensor, classes, target_recall: float,
                     max_lesions_called_normal: float | None, before: dict, patients: list[str] | None,
                     where: str) -> dict:
    """The lesion-first rule re-fitted on a hospital's labelled images (see run_calibrate), with its promise. It is
    fitted on the lesion scores as measured, without the parent's FAMILIAR_ONLY guard: its bounds are held on this
    hospital's own cancers and lesions, which is what the guard stood in for where no hospital had been measured (and
    at a new hospital most images are flagged, so a guarded rule could call none of its normal scans normal)."""
    from .operating import MAX_LESIONS_CALLED_NORMAL, MIN_POSITIVES, cross_fitted, decide, fit_joint_rule
    classes = list(classes)
    cap = max_lesions_called_normal if max_lesions_called_normal is not None else before.get(
        "max_lesions_called_normal", MAX_LESIONS_CALLED_NORMAL)
    normals = int((labels == classes.index("normal")).sum()) if "normal" in classes else 0
    keep = None
    if normals < MIN_POSITIVES:
        keep = before["lesion_threshold"]
        warn(f"{where}: {normals} normal scan(s), fewer than {MIN_POSITIVES}: the lesion threshold {keep:.3f} is kept "
             f"from {before.get('fitted_where', 'the parent model')}; only the malignant threshold is re-set")
    fit = {"max_lesions_called_normal": cap, "lesion_threshold": keep}
    measured = said.lesion_scores
    rule = fit_joint_rule(said.probs, measured, labels, classes, target_recall, where=f"images of {where}", **fit)
    promise = cross_fitted(said.probs, measured, labels, classes, target_recall, patients, **fit)
    negatives = labels != classes.index("malignant")
    called = decide(said.probs, classes, rule, measured)
    return {**rule, "recall_where_fitted": rule["where_fitted"]["malignant_recall"],
            "expected_recall": promise["malignant_recall"], "recall_ci": promise["recall_ci"],
            "ci_method": promise["ci_method"], "cross_fitted": promise,
            "previous_lesion_threshold": before["lesion_threshold"],
            "fitted_on_patients": len(set(patients)) if patients else None,
            "others_called_malignant": round(float((called[negatives] == classes.index("malignant")).float().mean()), 4)
            if negatives.any() else None}


def run_calibrate(checkpoint_path: str | Path, data, target_recall: float, out: str | Path | None = None,
                  overwrite: bool = False, meta: str | None = None, id_column: str = "ID",
                  patient_column: str | None = None, progress: bool = True,
                  max_lesions_called_normal: float | None = None) -> tuple[dict, Path]:
    """busi calibrate: the checkpoint with its decision rule re-set on labelled images of data (a folder with one
    sub-folder per class, some of the model's classes or all), with the recall it can promise new patients. A model
    that decides from its lesion outline gets both thresholds fitted together, as the bundled rule was
    (operating.fit_joint_rule: target_recall of the cancers through both steps, at most max_lesions_called_normal of
    the lesions called normal, then the most normal scans called normal and benign lesions benign; the lesion
    threshold is kept where fewer than MIN_POSITIVES normal scans are there to fit it on), and the recall it promises
    comes from the rule cross-fitted over patients (operating.cross_fitted), never from the images it was fitted on."""
    from .data import load, scan
    from .external import relabel
    from .meta import read_meta
    from .operating import LESION_FIRST, decide, fit_with_ci
    if not 0 < target_recall <= 1:
        raise BusiError(f"--malignant-recall must be in (0, 1], got {target_recall}")
    if max_lesions_called_normal is not None and not 0 <= max_lesions_called_normal < 1:
        raise BusiError(f"--max-lesions-called-normal must be in [0, 1), got {max_lesions_called_normal}")
    if patient_column and not meta:
        raise BusiError("--patient-column needs --meta FILE.csv")
    loaded = LoadedModel(checkpoint_path)
    model, config, extras = loaded.checkpoint("busi calibrate")
    dataset, _ = relabel(scan(data), config["classes"], str(checkpoint_path))
    images, labels, dataset = load(dataset, config["image_size"], progress, config.get("preprocess", ()))
    paths = [s.path for s in dataset.samples]
    patients = None
    if patient_column:
        rows, notes = read_meta(meta, id_column, [patient_column], paths)
        for line in notes:
            warn(line)
        patients = [rows.get(p, {}).get(patient_column) or f"image:{p}" for p in paths]
    said = loaded.run(images)
    before = config.get("operating_point")
    decided_on = decision_scores(config, said.lesion_scores, said.distances)
    if before and before.get("rule") == LESION_FIRST:
        point = lesion_rule_here(said, labels, config["classes"], target_recall, max_lesions_called_normal, before,
                                 patients, str(data))
    else:
        point = fit_with_ci(said.probs, labels, config["classes"], target_recall, patients, where=str(data))
        point["fitted_where"] = f"images of {data}"
    k = list(config["classes"]).index(point["class"])
    malignant = labels == k
    record = {"command": "calibrate", "data": str(data), "n_images": len(paths), "operating_point": point,
              "previous_operating_point": before,
              "previous_recall_here": round(float((decide(said.probs, config["classes"], before, decided_on)
                                                   [malignant] == k).float().mean()), 4) if before else None,
              "at": datetime.now().isoformat(timespec="seconds"), "busi_version": __version__,
              "parent": parent_of(checkpoint_path, config)}
    config = {**config, "operating_point": point, "parent": record["parent"]}
    return record, save_derived(out, model, config, extras, record, overwrite)
