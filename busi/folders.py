"""Finding the images of a class-per-folder dataset: classes, lesion masks, stray files (no torch, so it is fast)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .dicom import facts, is_dicom
from .errors import BusiError

BUSI_CLASSES = ("benign", "malignant", "normal")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
FRAME_MARK = "#frame="  # a sample standing for one frame of a cine loop: "<the loop's path>#frame=<n>" (every_frame)
# BUSI names masks "benign (12)_mask.png" and, for extra lesions, "benign (12)_mask_1.png".
MASK_NAME = re.compile(r"^(?P<stem>.+)_mask(?:_\d+)?$")


def is_dicom_file(path: Path) -> bool:
    """A file to read as DICOM: not named as another image format, and DICOM by content (with or without .dcm)."""
    return Path(path).suffix.lower() not in IMAGE_SUFFIXES and is_dicom(path)


def is_image_file(path: Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES or is_dicom_file(path)


def image_files(inputs: list[str | Path]) -> list[Path]:
    """Files as given; folders searched recursively for images, masks left out."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file() and not MASK_NAME.match(p.stem)
                            and not p.name.startswith(".")
                            and is_image_file(p))
        else:
            files.append(item)
    return files


def unreadable(path: Path) -> str | None:
    """Why a file given as an image cannot be one, found from its first bytes (cheap: before any model is loaded); None
    when its header reads."""
    if not path.exists():
        return "no such file"
    if path.is_dir() or is_dicom_file(path):
        return None
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an image file ({path.suffix or 'no extension'})"
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im.size  # noqa: B018  (the header is read; the pixels are not)
    except (UnidentifiedImageError, OSError) as e:
        return f"not a readable image ({type(e).__name__})"
    return None


@dataclass(frozen=True)
class Sample:
    path: str  # relative to the dataset root, with forward slashes: stable across machines
    label: int
    mask_paths: tuple[str, ...] = ()


@dataclass
class Dataset:
    root: Path
    classes: tuple[str, ...]
    samples: list[Sample]
    skipped: dict[str, str] = field(default_factory=dict)  # relative path -> why it was left out
    # several folders pooled (--data A --data B): source name -> folder; every path then starts with its source name
    sources: dict[str, Path] | None = None
    # per image, facts from meta CSVs (busi.meta): {path: {"patient": …, "group": …}}
    info: dict[str, dict[str, str]] = field(default_factory=dict)

    def file(self, sample: Sample | str) -> Path:
        path = (sample.path if isinstance(sample, Sample) else sample).split(FRAME_MARK)[0]
        if self.sources:
            name, rest = path.split("/", 1)
            return self.sources[name] / rest
        return self.root / path

    @staticmethod
    def frame(sample: Sample) -> int | None:
        """The frame of a cine loop a sample stands for (every_frame), None for a whole file."""
        return int(sample.path.split(FRAME_MARK)[1]) if FRAME_MARK in sample.path else None

    def source_of(self, sample: Sample) -> str:
        return sample.path.split("/", 1)[0] if self.sources else self.root.name

    def counts(self) -> dict[str, int]:
        return {c: sum(s.label == i for s in self.samples) for i, c in enumerate(self.classes)}

    def subset(self, indices) -> "Dataset":
        return self.with_samples([self.samples[i] for i in indices])

    def with_samples(self, samples: list[Sample], skipped: dict[str, str] | None = None) -> "Dataset":
        return Dataset(self.root, self.classes, samples, dict(self.skipped if skipped is None else skipped), self.sources,
                       self.info)

    def patient_groups(self) -> list[list[str]]:
        """The images of each patient named in the meta, as lists of paths (for busi.split.group_ids)."""
        by: dict[str, list[str]] = {}
        for s in self.samples:
            patient = self.info.get(s.path, {}).get("patient")
            if patient:
                by.setdefault(f"{self.source_of(s)}:{patient}", []).append(s.path)
        return list(by.values())


def source_names(roots: list[Path]) -> list[str]:
    """A short, unique name per folder: its own name, or its name and its parent's when two share one."""
    names = [r.resolve().name for r in roots]
    out = [n if names.count(n) == 1 else f"{r.resolve().parent.name}-{n}" for n, r in zip(names, roots)]
    if len(set(out)) < len(out):
        raise BusiError(f"the same data folder is given twice: {', '.join(str(r) for r in roots)}")
    return out


def every_frame(dataset: Dataset) -> Dataset:
    """Each frame of a DICOM cine loop as a sample of its own ("benign/loop.dcm#frame=3"), with the loop's label."""
    from .errors import BusiError
    out = []
    for sample in dataset.samples:
        path, frames = dataset.file(sample), 1
        if is_dicom_file(path):
            try:
                frames = facts(path)["frames"]
            except BusiError:  # left whole: decoding it says what is wrong, once
                pass
        out += [sample] if frames <= 1 else [Sample(f"{sample.path}{FRAME_MARK}{i}", sample.label, sample.mask_paths)
                                             for i in range(frames)]
    return dataset.with_samples(out)


def scan_sources(roots, classes=None) -> Dataset:
    """One folder, or several pooled: each keeps its name as a source; a source may hold a subset of the classes (another
    hospital's benign/malignant set). Without --classes the classes are the first folder's, joined by any of benign,
    malignant and normal that another source adds (BUS-BRA first, then a set with normal scans), in name order; a
    folder of any other name that the first lacks is refused, never taught as a class of its own."""
    roots = [Path(r) for r in ([roots] if isinstance(roots, (str, Path)) else roots)]
    if len(roots) == 1:
        return scan(roots[0], classes)
    first = scan(roots[0], classes)
    names = source_names(roots)
    scanned = [first] + [scan(root) for root in roots[1:]]
    target = first.classes
    for root, ds in zip(roots, scanned):
        extra = [c for c in ds.classes if c not in target]
        if extra and (classes is not None or any(c not in BUSI_CLASSES for c in extra + list(target))):
            raise BusiError(f"{root}: class folder(s) {', '.join(extra)} are not among the classes of {roots[0]} "
                            f"({', '.join(first.classes)})")
        if extra:
            target = tuple(sorted({*target, *extra}))
    samples, skipped = [], {}
    for name, ds in zip(names, scanned):
        samples += [Sample(f"{name}/{s.path}", target.index(ds.classes[s.label]),
                           tuple(f"{name}/{m}" for m in s.mask_paths)) for s in ds.samples]
        skipped.update({f"{name}/{k}": v for k, v in ds.skipped.items()})
    return Dataset(roots[0], target, samples, skipped, dict(zip(names, roots)))


def scan(root: str | Path, classes: tuple[str, ...] | list[str] | None = None) -> Dataset:
    """List the images of a folder with one sub-folder per class; masks are attached, not classified."""
    root = Path(root)
    if not root.exists():
        raise BusiError(f"{root}: data folder does not exist")
    if not root.is_dir():
        raise BusiError(f"{root}: is not a folder")
    skipped: dict[str, str] = {}
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for p in sorted(root.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            skipped[p.name] = "not inside a class folder"
    if classes is None:
        if not folders:
            raise BusiError(f"{root}: no class folders (expected one sub-folder per class, e.g. {', '.join(BUSI_CLASSES)})")
        classes = tuple(p.name for p in folders)
    else:
        classes = tuple(classes)
        names = {p.name for p in folders}
        missing = [c for c in classes if c not in names]
        if missing:
            raise BusiError(f"{root}: missing class folder(s) {', '.join(missing)} (found: {', '.join(sorted(names)) or 'none'})")
        for p in folders:
            if p.name not in classes:
                skipped[p.name + "/"] = "folder is not one of the classes " + ", ".join(classes)

    samples: list[Sample] = []
    for label, name in enumerate(classes):
        images: dict[str, str] = {}
        masks: dict[str, list[str]] = {}
        for f in sorted((root / name).iterdir()):
            rel = f"{name}/{f.name}"
            if f.name.startswith("."):
                skipped[rel] = "hidden file"
            elif f.is_dir():
                skipped[rel + "/"] = "nested folder inside a class folder"
            elif not is_image_file(f):
                skipped[rel] = f"not an image file ({f.suffix or 'no extension'})"
            elif m := MASK_NAME.match(f.stem):
                masks.setdefault(m["stem"], []).append(rel)
            else:
                images[f.stem] = rel
        for stem, rels in masks.items():
            if stem not in images:
                for rel in rels:
                    skipped[rel] = "mask without a matching image"
        if not images:
            nested = sorted(p.name for p in (root / name).iterdir() if p.is_dir() and not p.name.startswith("."))
            hint = f"; it holds folders ({', '.join(nested[:4])}): did you mean --data {root / name}?" if nested else ""
            raise BusiError(f"{root / name}: class folder holds no images{hint}")
        samples += [Sample(rel, label, tuple(masks.get(stem, ()))) for stem, rel in images.items()]
    return Dataset(root, classes, samples, skipped)


def header_info(dataset) -> dict[str, dict[str, str]]:
    """{image path: {"patient": hashed key, "group": scanner}} for a dataset's DICOM images: the patients and scanners
    their headers name, for grouped splits, patient intervals and per-scanner figures without a meta CSV."""
    out = {}
    for sample in dataset.samples:
        path = dataset.file(sample)
        if is_dicom_file(path):
            found = facts(path)
            out[sample.path] = {k: v for k, v in (("patient", found["patient"]), ("group", found["scanner"])) if v}
    return out
