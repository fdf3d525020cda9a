"""Dataset audit: counts, sizes, skipped files, near-duplicate groups and label conflicts (cached by content)."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import imagehash
import numpy as np
import scipy.fftpack  # noqa: F401 - imagehash.phash imports it on first use: here, before any thread does
from PIL import Image
from tqdm.auto import tqdm

from .data import Dataset, Sample, is_dicom_file, open_image
from .errors import BusiError
from .runs import cache_dir

AUDIT_VERSION = 2  # bump when the method changes, so cached audits are recomputed
# Copies and resizes of one scan: perceptual hashes this close, confirmed by thumbnail correlation.
PHASH_MAX_DISTANCE = 10
COPY_MIN_CORRELATION = 0.90
# Crops, zooms and shifts: ORB keypoints agreeing on one similarity transform, confirmed by the
# pixels of the overlap (unrelated scans that share burned-in text fail that check).
ORB_SIDE = 384
ORB_FEATURES = 400
CANDIDATES_PER_IMAGE = 8
SHORTLIST_DESCRIPTORS = 80
MIN_INLIERS = 20
CROP_MIN_CORRELATION = 0.80
CROP_MIN_OVERLAP = 0.15  # share of the smaller image the overlap must cover


@dataclass
class _Features:
    phash: np.ndarray  # 64 bools
    thumb: np.ndarray  # 32x32 float, zero mean unit norm
    gray: np.ndarray  # uint8, longest side ORB_SIDE
    keypoints: np.ndarray  # Kx2 float32
    descriptors: np.ndarray | None  # Kx32 uint8


def _features(path: Path) -> _Features:
    im = open_image(path).convert("L")
    phash = imagehash.phash(im).hash.flatten()
    thumb = np.asarray(im.resize((32, 32), Image.BILINEAR), dtype=np.float32)  # as _thumb, before rounding
    thumb = thumb - thumb.mean()
    thumb /= np.linalg.norm(thumb) + 1e-6
    scale = ORB_SIDE / max(im.size)
    gray = np.asarray(im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR))
    orb = cv2.ORB_create(nfeatures=ORB_FEATURES)
    kps, desc = orb.detectAndCompute(gray, None)
    pts = np.array([k.pt for k in kps], dtype=np.float32).reshape(-1, 2)
    return _Features(phash, thumb, gray, pts, desc)


def _copy_pairs(feats: list[_Features]) -> set[tuple[int, int]]:
    hashes = np.stack([f.phash for f in feats]).astype(np.uint8)
    distance = (hashes[:, None, :] != hashes[None, :, :]).sum(-1)
    thumbs = np.stack([f.thumb.ravel() for f in feats])
    correlation = thumbs @ thumbs.T
    i, j = np.nonzero(np.triu((distance <= PHASH_MAX_DISTANCE) & (correlation >= COPY_MIN_CORRELATION), 1))
    return set(zip(i.tolist(), j.tolist()))


def _candidate_pairs(feats: list[_Features]) -> set[tuple[int, int]]:
    """Shortlist pairs whose strongest descriptors often find each other as nearest neighbours.

    Matching every pair of images costs minutes; one brute-force k-NN over a few descriptors per
    image costs seconds and keeps (on busi_dev) all but one of the pairs full matching confirms.
    """
    owner, stacks = [], []
    for n, f in enumerate(feats):
        if f.descriptors is not None and len(f.descriptors) >= MIN_INLIERS:
            d = f.descriptors[:SHORTLIST_DESCRIPTORS]  # ORB returns the strongest corners first
            owner.append(np.full(len(d), n))
            stacks.append(d)
    if len(stacks) < 2:
        return set()
    owner, everything = np.concatenate(owner), np.concatenate(stacks)
    votes: Counter = Counter()
    for q, neighbours in enumerate(cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(everything, everything, k=4)):
        a, seen = int(owner[q]), set()
        for m in neighbours:
            b = int(owner[m.trainIdx])
            if b != a and b not in seen and m.distance < 64:
                seen.add(b)
                votes[(min(a, b), max(a, b))] += 1
    ranked: dict[int, list[tuple[int, tuple[int, int]]]] = {}
    for pair, v in votes.items():
        for n in pair:
            ranked.setdefault(n, []).append((v, pair))
    shortlist = set()
    for lst in ranked.values():
        lst.sort(reverse=True)
        shortlist.update(pair for v, pair in lst[:CANDIDATES_PER_IMAGE] if v >= 3)
    return shortlist


def _crop_match(a: _Features, b: _Features) -> bool:
    """True when b shows part of a (or a of b) under one similarity transform, confirmed by pixels."""
    if a.descriptors is None or b.descriptors is None:
        return False
    matches = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(a.descriptors, b.descriptors, k=2)
    good = [m[0] for m in matches if len(m) == 2 and m[0].distance < 0.8 * m[1].distance]
    if len(good) < MIN_INLIERS:
        return False
    src = a.keypoints[[m.queryIdx for m in good]]
    dst = b.keypoints[[m.trainIdx for m in good]]
    transform, inliers = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=4.0)
    if transform is None or int(inliers.sum()) < MIN_INLIERS:
        return False
    scale = float(np.hypot(transform[0, 0], transform[1, 0]))
    angle = abs(float(np.degrees(np.arctan2(transform[1, 0], transform[0, 0]))))
    if not (0.33 < scale < 3.0) or angle > 10:
        return False
    # Inliers bunched in a small patch are text or calipers, not the same anatomy.
    inlier_pts = dst[inliers.ravel() == 1]
    spread = np.ptp(inlier_pts, axis=0) / np.array(b.gray.shape[::-1])
    if spread.min() < 0.2:
        return False
    h, w = b.gray.shape
    warped = cv2.warpAffine(a.gray, transform, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
    covered = cv2.warpAffine(np.ones_like(a.gray), transform, (w, h), flags=cv2.INTER_NEAREST, borderValue=0) > 0
    overlap = covered.sum()
    if overlap < CROP_MIN_OVERLAP * min(a.gray.size, b.gray.size):
        return False
    x, y = warped[covered].astype(np.float32), b.gray[covered].astype(np.float32)
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-6)) >= CROP_MIN_CORRELATION


def _groups(n: int, pairs: set[tuple[int, int]]) -> list[list[int]]:
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        parent[find(i)] = find(j)
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(find(i), []).append(i)
    return sorted((sorted(g) for g in members.values() if len(g) > 1), key=lambda g: g[0])


def _content_key(dataset: Dataset) -> str:
    digest = hashlib.sha256(f"busi-audit-v{AUDIT_VERSION}".encode())
    for s in sorted(dataset.samples, key=lambda s: s.path):
        digest.update(s.path.encode() + b"\0" + str(s.label).encode() + b"\0")
        digest.update(hashlib.sha256(dataset.file(s).read_bytes()).digest())
    return digest.hexdigest()


def audit(dataset: Dataset, progress: bool = True, use_cache: bool = True) -> dict:
    """Summarise a scanned dataset and find its near-duplicate groups; cached by file content."""
    key = _content_key(dataset)
    cached = cache_dir() / "audit" / f"{key}.json"
    if use_cache and cached.exists():
        try:
            result = json.loads(cached.read_text())
            result["skipped"] = {**dataset.skipped, **result["skipped"]}
            return result
        except (json.JSONDecodeError, KeyError):
            pass  # a damaged cache entry is recomputed, never trusted

    def features(sample):
        try:
            path = dataset.file(sample)
            if is_dicom_file(path):
                return _features(path), open_image(path).size, "DICOM", None
            with Image.open(path) as im:
                size, mode = im.size, im.mode
            return _features(path), size, mode, None
        except BusiError as e:
            return None, None, None, str(e)
        except OSError as e:
            return None, None, None, f"{dataset.file(sample)}: not a readable image ({e})"

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(tqdm(pool.map(features, dataset.samples), total=len(dataset.samples),
                            desc="audit: reading images", disable=not progress, leave=False))
    skipped = dict(dataset.skipped)
    kept, feats, sizes, modes = [], [], Counter(), Counter()
    for sample, (f, size, mode, err) in zip(dataset.samples, results):
        if err:
            skipped[sample.path] = err
            continue
        kept.append(sample)
        feats.append(f)
        sizes[size] += 1
        modes[mode] += 1

    pairs = _copy_pairs(feats) if len(feats) > 1 else set()  # no pairs among fewer than two readable images
    candidates = _candidate_pairs(feats) - pairs if len(feats) > 1 else set()
    for a, b in tqdm(sorted(candidates), desc="audit: matching keypoints", disable=not progress, leave=False):
        if _crop_match(feats[a], feats[b]) or _crop_match(feats[b], feats[a]):
            pairs.add((a, b))
    groups = [[kept[i].path for i in g] for g in _groups(len(kept), pairs)]
    label_of = {s.path: s.label for s in kept}
    conflicts = [g for g in groups if len({label_of[p] for p in g}) > 1]
    widths = [w for w, _ in sizes.elements()]
    heights = [h for _, h in sizes.elements()]
    result = {
        "audit_version": AUDIT_VERSION,
        "root": str(dataset.root),
        "n_images": len(kept),
        "classes": {c: sum(label_of[s.path] == i for s in kept) for i, c in enumerate(dataset.classes)},
        "image_sizes": {"width_min": min(widths, default=0), "width_max": max(widths, default=0),
                        "height_min": min(heights, default=0), "height_max": max(heights, default=0),
                        "most_common": [[w, h, n] for (w, h), n in sizes.most_common(5)]},
        "modes": dict(modes),
        "masks": {"images_with_mask": sum(bool(s.mask_paths) for s in kept),
                  "images_without_mask": sum(not s.mask_paths for s in kept),
                  "mask_files": sum(len(s.mask_paths) for s in kept)},
        **({"dicom": dicom_summary(dataset.with_samples(kept))} if modes.get("DICOM") else {}),
        "duplicate_groups": groups,
        "duplicate_images": sum(len(g) for g in groups),
        "label_conflicts": conflicts,
        "skipped": skipped,
    }
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(cached)
    return result


def near_duplicates_across(reference: Dataset, other: Dataset, progress: bool = True) -> dict[str, list[str]]:
    """Images of `other` that are (near-)copies of images of `reference`: other's path -> reference's paths.

    This is how a test folder is checked against the images a model trained on: a hit there tests memory, not skill.
    """
    ref_rel = {str(reference.file(s).resolve()): s.path for s in reference.samples}
    other_rel = {str(other.file(s).resolve()): s.path for s in other.samples}
    found = {other_rel[f]: [ref_rel[f]] for f in other_rel if f in ref_rel}  # the very same file
    rest = [Sample(f, s.label) for f, s in zip(other_rel, other.samples) if f not in ref_rel]
    combined = Dataset(Path("/"), reference.classes, [Sample(f, s.label) for f, s in zip(ref_rel, reference.samples)] + rest)
    for group in audit(combined, progress=progress)["duplicate_groups"]:  # absolute paths: "/" / path is the path
        refs = sorted(ref_rel[f] for f in group if f in ref_rel)
        for f in group:
            if refs and f in other_rel and f not in ref_rel:
                found[other_rel[f]] = refs
    return found


def _thumb(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("L").resize((32, 32), Image.BILINEAR))


def fingerprint(im: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """One decoded image's perceptual hash (64 bits) and 32x32 grey thumbnail."""
    return imagehash.phash(im.convert("L")).hash.flatten(), _thumb(im)


def packed(found: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Fingerprints as the tensors a checkpoint carries: hashes packed 8 bits a byte, thumbnails as they are."""
    import torch
    return {"fingerprints.phash": torch.from_numpy(np.packbits(np.stack([h for h, _ in found]), axis=1)),
            "fingerprints.thumb": torch.from_numpy(np.stack([t for _, t in found]))}


def fingerprints(dataset: Dataset, progress: bool = True) -> dict:
    """Each image's perceptual hash and 32x32 grey thumbnail (about 1 KB an image): enough to recognise copies and
    resizes of these images later without the folder, so a model can carry those of its training images."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        found = list(tqdm(pool.map(lambda sample: fingerprint(open_image(dataset.file(sample))), dataset.samples),
                          total=len(dataset.samples), desc="fingerprints", disable=not progress, leave=False))
    return packed(found)


def _unit(thumbs: np.ndarray) -> np.ndarray:
    x = thumbs.reshape(len(thumbs), -1).astype(np.float32)
    x -= x.mean(1, keepdims=True)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-6)


def copies_of_fingerprints(tensors: dict, reference_paths: list[str], other: Dataset,
                           progress: bool = True, theirs: dict | None = None) -> dict[str, list[str]]:
    """Images of `other` that are copies or resizes of fingerprinted images (the audit's first test: close perceptual
    hashes and correlated thumbnails): other's path -> the fingerprinted images' paths. Crops and zooms need the
    images themselves (near_duplicates_across). theirs: other's fingerprints when already taken (in its order)."""
    theirs = fingerprints(other, progress) if theirs is None else theirs
    ref_bits = np.unpackbits(tensors["fingerprints.phash"].numpy(), axis=1).astype(bool)
    bits = np.unpackbits(theirs["fingerprints.phash"].numpy(), axis=1).astype(bool)
    distance = (bits[:, None, :] != ref_bits[None, :, :]).sum(-1)
    correlation = _unit(theirs["fingerprints.thumb"].numpy()) @ _unit(tensors["fingerprints.thumb"].numpy()).T
    hits = (distance <= PHASH_MAX_DISTANCE) & (correlation >= COPY_MIN_CORRELATION)
    return {s.path: [reference_paths[j] for j in np.flatnonzero(row)] for s, row in zip(other.samples, hits) if row.any()}


def dicom_summary(dataset: Dataset) -> dict:
    """What the DICOM files' headers say: how many, of how many patients (never who), scanners, encodings, cine
    loops, and how many carry a pixel size (for lesion sizes in millimetres)."""
    from .dicom import facts
    files = dict.fromkeys(dataset.file(s) for s in dataset.samples)  # a loop's frames (--cine-frames all): one file
    found = [facts(f) for f in files if is_dicom_file(f)]
    return {"files": len(found), "patients": len({f["patient"] for f in found if f["patient"]}),
            "scanners": dict(Counter(f["scanner"] or "unnamed" for f in found)),
            "transfer_syntaxes": dict(Counter(f["transfer_syntax"] or "unknown" for f in found)),
            "multi_frame": sum(f["frames"] > 1 for f in found),
            "with_pixel_size": sum(f["mm_per_pixel"] is not None for f in found)}


def run_audit(data: str | Path, out: str | Path | None = None, classes=None, overwrite: bool = False,
              progress: bool = True) -> tuple[dict, Path]:
    """busi audit: a folder's summary and near-duplicate groups, written to <out>/audit.json."""
    from .folders import scan
    from .runs import run_dir
    dataset = scan(data, classes)
    folder = run_dir(out, "audit", overwrite)
    result = audit(dataset, progress=progress)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "audit.json").write_text(json.dumps(result, indent=2))
    return result, folder


def summary(result: dict) -> str:
    """A few lines for the terminal."""
    counts = ", ".join(f"{c} {n}" for c, n in result["classes"].items())
    s = result["image_sizes"]
    lines = [
        f"{result['n_images']} images ({counts}); sizes {s['width_min']}-{s['width_max']} x {s['height_min']}-{s['height_max']}; "
        f"modes {', '.join(f'{m} {n}' for m, n in result['modes'].items())}",
        f"masks: {result['masks']['images_with_mask']} images have one, {result['masks']['images_without_mask']} have none",
        f"near-duplicates: {len(result['duplicate_groups'])} groups holding {result['duplicate_images']} images",
        f"label conflicts: {len(result['label_conflicts'])} groups filed under more than one class",
    ]
    if result.get("dicom"):
        d = result["dicom"]
        lines.append(f"DICOM: {d['files']} files of {d['patients']} patients; scanners "
                     + ", ".join(f"{k} {v}" for k, v in d["scanners"].items()) + "; "
                     + ", ".join(f"{k} {v}" for k, v in d["transfer_syntaxes"].items())
                     + f"; {d['multi_frame']} cine loops; {d['with_pixel_size']} with a pixel size")
    if result["skipped"]:
        lines.append(f"skipped: {len(result['skipped'])} files (reasons in audit.json)")
    return "\n".join(lines)
