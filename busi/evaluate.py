"""busi evaluate: a saved model on a labelled folder -> a run folder (metrics, predictions, pictures, report), and
which of the folder's images the model has seen copies of."""
from __future__ import annotations

import json
from pathlib import Path


import torch

from . import __version__, shift
from .audit import copies_of_fingerprints, fingerprint as fingerprint_of, near_duplicates_across, packed
from .data import Dataset, Rows, batches, load_masks, report_mask_problems, reread, scan
from .errors import BusiError
from .folders import scan_sources
from .inference import LoadedModel, decision_scores
from .lesion import dice_iou
from .pipeline import ahead, import_ahead
from .runs import run_dir


def carries_fingerprints(config: dict, extras: dict | None) -> bool:
    """Whether the checkpoint carries fingerprints of the images that shaped it."""
    return bool(extras and "fingerprints.phash" in extras and config.get("fingerprint_paths"))


def training_overlap(checkpoint_path: str | Path, config: dict, dataset: Dataset, train_data: str | Path | None = None,
                     progress: bool = True, extras: dict | None = None, theirs: dict | None = None) -> dict:
    """Which images of dataset have a near-duplicate among the images the checkpoint's model trained on: against the
    training folder when it is here (copies, resizes, crops and zooms), and against the fingerprints the checkpoint
    carries of every image that shaped it, its parent's too (copies and resizes). theirs: dataset's own fingerprints
    when already taken."""
    from .external import relabel
    if train_data is not None and not Path(train_data).is_dir():
        raise BusiError(f"{train_data}: --train-data folder does not exist")
    given = train_data or config.get("trained_on")
    roots = given if isinstance(given, list) else [given] if given else []  # a list: several sources pooled
    here = bool(roots) and all(Path(r).is_dir() for r in roots)
    fingerprinted = carries_fingerprints(config, extras)
    if not here and not fingerprinted:
        return {"checked": False, "note": f"the training data ({', '.join(map(str, roots)) or 'unnamed'}) is not here and the "
                                          "model carries no fingerprints of it: pass --train-data DIR to check"}
    seen, methods, counted = {}, [], 0
    if fingerprinted:
        seen = copies_of_fingerprints(extras, config["fingerprint_paths"], dataset, progress, theirs)
        counted = len(config["fingerprint_paths"])
        methods.append("the fingerprints the model carries of the images that shaped it: copies and resizes")
    if here:
        reference, _ = relabel(scan_sources(roots), config["classes"], str(checkpoint_path))  # may hold some classes
        split = Path(checkpoint_path).parent.parent / "split.json"
        if split.is_file():  # only what trained the model (training and validation part), not its own test part
            parts = json.loads(split.read_text())
            used = set(parts["train"]) | set(parts["val"])
            if used <= {s.path for s in reference.samples}:
                reference = reference.with_samples([s for s in reference.samples if s.path in used])
        for path, refs in near_duplicates_across(reference, dataset, progress).items():
            seen[path] = sorted(set(seen.get(path, [])) | set(refs))
        counted = max(counted, len(reference.samples))
        methods.append("its training folder: copies, resizes, crops and zooms")
    elif fingerprinted:
        methods.append("crops and zooms need the training folder: --train-data DIR")
    return {"checked": True, "method": "; ".join(methods),
            "training_data": ([str(Path(r).resolve()) for r in roots] if len(roots) > 1 else str(Path(roots[0]).resolve()))
            if here else "fingerprints", "n_training_images": counted,
            "n_with_near_duplicate_in_training": len(seen), "near_duplicates": seen}


def run_evaluate(checkpoint_path: str | Path, data: str | Path, out: str | Path | None = None, overwrite: bool = False,
                 progress: bool = True, train_data: str | Path | None = None, meta: str | Path | None = None,
                 id_column: str = "ID", group_column: str | None = None, patient_column: str | None = None,
                 engine: str = "auto") -> tuple[dict, Path]:
    """Evaluate a saved model on every readable image of a folder, and again without the images it has seen copies of.

    The folder may hold a subset of the model's classes (another hospital's benign/malignant set); a meta CSV adds
    per-group figures (e.g. per scanner) and a bootstrap over patients instead of images.
    """
    if (group_column or patient_column) and not meta:
        raise BusiError("--group-column and --patient-column need --meta FILE.csv")
    loaded = LoadedModel(checkpoint_path)
    model, config, extras = loaded.checkpoint("busi evaluate (Grad-CAM, the shift check)")
    from .external import figures, relabel
    # labels re-numbered in the model's class order, so every figure speaks of the model's classes
    dataset, absent = relabel(scan(data), config["classes"], str(checkpoint_path))
    folder = run_dir(out, f"evaluate-{config['arch']}", overwrite)
    loaded.use_engine(engine, len(dataset.samples))
    seen = _stream(loaded, dataset, progress, fingerprint=carries_fingerprints(config, extras),
                   meanwhile=("busi.results", "busi.report"))  # the pictures' and metrics' libraries
    dataset, labels, status = seen["dataset"], seen["labels"], seen["mask_status"]
    probs, distances, scores = seen["probs"], seen.get("distances"), seen.get("lesion_scores")
    decided_on = decision_scores(config, scores, distances)  # what the rule reads; scores as measured for the rest
    import yaml
    from .metrics import compute_metrics
    from .report import render
    from .results import write_results
    overlap = training_overlap(checkpoint_path, config, dataset, train_data, progress, extras, seen.get("fingerprints"))
    lesion = {}
    if scores is not None:
        from .lesion import lesion_figures
        paths = [s.path for s in dataset.samples]
        rows = {}
        if meta and (patient_column or group_column):  # patients for the interval, groups (scanners) for figures
            from .meta import read_meta
            rows, _ = read_meta(meta, id_column, [c for c in (patient_column, group_column) if c], paths)
        lesion = {"lesion": lesion_figures(
            scores, seen["lesion_dice"], seen["lesion_iou"], status, labels, config["classes"],
            config.get("operating_point"),
            patients=[rows.get(p, {}).get(patient_column) or f"image:{p}" for p in paths] if patient_column else None,
            groups=[rows.get(p, {}).get(group_column) or "unknown" for p in paths] if group_column else None)}
    if overlap["checked"] and overlap["near_duplicates"]:
        unseen = [i for i, s in enumerate(dataset.samples) if s.path not in overlap["near_duplicates"]]
        if unseen:
            m = compute_metrics(probs[unseen], labels[unseen], config["classes"])
            overlap["metrics_without_them"] = {"n": m["n"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                                               "auroc": m["auroc"],
                                               "recall": {c: v["recall"] for c, v in m["per_class"].items()}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"command": "evaluate", "checkpoint": str(checkpoint_path),
                                                     "data": str(data), "busi_version": __version__}, sort_keys=False))
    if distances is not None:
        extra_shift = {"shift": {**shift.verdict(distances > config["shift"]["threshold"]),
                                 "threshold": config["shift"]["threshold"],
                                 "method": f"distance to the {config['shift']['k']}th nearest training image in the "
                                           f"model's feature space; {config['shift']['quantile']:.0%} of "
                                           f"{config['shift']['n_heldout']} held-out images of its training sources "
                                           "lie within the threshold"}}
    else:
        extra_shift = {"shift": {"note": "this checkpoint carries no summary of its training images (trained "
                                         "without a validation part, or by busi before 0.2)"}}
    extra = {**extra_shift, "command": "evaluate", "data": str(data),
             "rule_fitted_where": (config.get("operating_point") or {}).get("fitted_where"),
             "model": config["arch"], "checkpoint": str(checkpoint_path), "skipped": dataset.skipped,
             "training_overlap": overlap, **lesion, **figures(probs, config, labels, dataset, meta, id_column,
                                                              group_column, patient_column, decided_on)}
    # the pictures show a few dozen images: read again then, not kept from the stream
    size, steps = config["image_size"], config.get("preprocess", ())
    images = reread(dataset, size, steps)
    masks = Rows(len(labels), lambda rows: load_masks(dataset.with_samples([dataset.samples[i] for i in rows]), size,
                                                      steps, seen["geometry"], report=False)[0])
    maps = None if scores is None else Rows(len(labels), lambda rows: loaded.run(images[rows]).lesion_maps)
    metrics = write_results(folder, model, config, images, labels, [s.path for s in dataset.samples], masks, status, extra,
                            logits=seen["logits"], shift_distances=distances, lesion_scores=scores,
                            lesion_dice=seen.get("lesion_dice"), lesion_maps=maps, decision_scores=decided_on)
    render(folder)
    return metrics, folder


def _stream(loaded: LoadedModel, dataset: Dataset, progress: bool, batch_size: int = 32, fingerprint: bool = False,
            meanwhile: tuple[str, ...] = ()) -> dict:
    """The model on every readable image of dataset, a batch at a time (decoding the next batches meanwhile), keeping
    per image only what the figures need: labels, logits, probabilities, distances, lesion scores, Dice and IoU, the
    mask's status and where the scan crop cut it (a few numbers), and with fingerprint its copy-check fingerprints,
    taken from the same decoding. The modules named in meanwhile are imported while the network runs: from the end
    of the first batch (reading has loaded what it needs by then) until before this returns (import_ahead says why).
    No image, mask or map is kept: memory stays flat however large the folder."""
    config = loaded.config
    size, steps = config["image_size"], config.get("preprocess", ())
    geometry: dict = {}
    skipped, kept, status = dict(dataset.skipped), [], []
    parts: dict[str, list] = {}
    def with_masks(batch: tuple) -> tuple:  # a batch's masks, read while the network runs on the batch before
        images, labels, samples = batch
        return (images, labels, samples,
                *load_masks(dataset.with_samples(samples), size, steps, geometry, report=False))

    prints: dict = {}
    importing = None
    look = None
    if fingerprint:
        def look(sample, image):
            prints[sample.path] = fingerprint_of(image)
    read = batches(dataset, size, batch_size, steps, geometry, skipped, progress, "evaluating", look)
    for images, labels, samples, masks, batch_status in ahead(read, with_masks):
        said = loaded.run(images)
        found = {"labels": labels, "logits": said.logits, "probs": said.probs, "distances": said.distances,
                 "lesion_scores": said.lesion_scores}
        if said.lesion_maps is not None:
            found["lesion_dice"], found["lesion_iou"] = dice_iou(said.lesion_maps, masks, batch_status)
        for key, value in found.items():
            if value is not None:
                parts.setdefault(key, []).append(value)
        if importing is None and meanwhile:
            importing = import_ahead(*meanwhile)
        kept += samples
        status += batch_status
    if importing is not None:
        importing.join()
    if not kept:
        raise BusiError(f"{dataset.root}: none of the images could be read")
    dataset = dataset.with_samples(kept, skipped)
    report_mask_problems(dataset.samples, status)
    return {"dataset": dataset, "mask_status": status, "geometry": geometry,
            **{key: torch.cat(value) for key, value in parts.items()},
            **({"fingerprints": packed([prints[s.path] for s in kept])} if fingerprint else {})}
