"""DICOM files as images: recognised by content, pixels decoded by pydicom (compressed transfer syntaxes through the
pylibjpeg plugins) into 8-bit RGB, and the header facts busi uses (patient, scanner, pixel size). Patient identifiers
leave this module only as a salted one-way hash."""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import BusiError

SUFFIXES = {".dcm", ".dicom"}
MAGIC_AT, MAGIC = 128, b"DICM"  # Part 10 files: a 128-byte preamble, then these four bytes
_SALT = os.urandom(16)  # per process: a patient's hash groups their images in this run and means nothing outside it
CM_UNITS = 3  # PhysicalUnitsX/YDirection code for centimetres (ultrasound regions)


def is_dicom(path: str | Path) -> bool:
    """True for a DICOM Part 10 file, whatever its name (a .dcm suffix is not needed, nor enough)."""
    try:
        with open(path, "rb") as f:
            head = f.read(MAGIC_AT + len(MAGIC))
    except OSError:
        return False
    return head[MAGIC_AT:] == MAGIC


def _read(path: Path, pixels: bool):
    import pydicom
    from pydicom.errors import InvalidDicomError
    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, AttributeError) as e:
        raise BusiError(f"{path}: not a readable DICOM file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'truncated?'})") from None


def _with_pixels(path: Path):
    ds = _read(path, pixels=True)
    if "PixelData" not in ds:
        kind = getattr(ds, "Modality", "") or "object"
        raise BusiError(f"{path}: a DICOM {kind} without pixel data (a report or key-object?): nothing to classify")
    return ds


def _undecodable(path: Path, ds, e: Exception) -> BusiError:
    syntax = ds.file_meta.get("TransferSyntaxUID")
    name = getattr(syntax, "name", str(syntax))
    return BusiError(f"{path}: its pixel data ({name}) cannot be decoded here ({str(e).splitlines()[0][:120]}); the "
                     "plugins busi installs (pylibjpeg, pylibjpeg-libjpeg, -openjpeg, -rle) read JPEG, JPEG-LS, "
                     "JPEG 2000 and RLE")


def pixels(path: str | Path, frame: int | None = None, notes: list[str] | None = None) -> np.ndarray:
    """One frame (default: the middle one of a cine loop) as HxWx3 uint8 RGB: MONOCHROME1 inverted, palette colour
    and YBR converted, deeper than 8 bits windowed (the file's VOI LUT or window, else its full range)."""
    from pydicom.pixels import pixel_array
    path = Path(path)
    ds = _with_pixels(path)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    index = middle_frame(frames) if frame is None else frame
    if not 0 <= index < frames:
        raise BusiError(f"{path}: has {frames} frame(s), no frame {index}")
    try:
        arr = pixel_array(ds, index=index if frames > 1 else None)
    except (NotImplementedError, RuntimeError, ValueError) as e:
        raise _undecodable(path, ds, e) from None
    if notes is not None and frames > 1 and frame is None:
        notes.append(f"a cine loop: frame {index} of {frames} used")
    return _rgb8(arr, ds, notes)


def middle_frame(frames: int) -> int:
    """The frame a cine loop is read as where one frame stands for it (training, evaluate, the web page)."""
    return frames // 2


def frames(path: str | Path):
    """Every frame of a file, in order, as HxWx3 uint8 RGB (as pixels converts them), one decoded at a time: a loop
    of hundreds of frames never sits in memory whole."""
    from pydicom.pixels import iter_pixels
    path = Path(path)
    ds = _with_pixels(path)
    try:
        for arr in iter_pixels(path):
            yield _rgb8(arr, ds, None)
    except (NotImplementedError, RuntimeError, ValueError) as e:
        raise _undecodable(path, ds, e) from None


def _rgb8(arr: np.ndarray, ds, notes: list[str] | None) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, apply_voi_lut
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        arr = (arr >> 8).astype(np.uint8) if arr.dtype != np.uint8 else arr
    elif arr.ndim == 2:  # greyscale
        bits = int(getattr(ds, "BitsStored", 8))
        if bits > 8 or arr.dtype != np.uint8:
            windowed = "WindowCenter" in ds or "VOILUTSequence" in ds
            if notes is not None:
                notes.append(f"{bits}-bit DICOM greyscale, " + ("windowed (its VOI)" if windowed else "rescaled")
                             + " to 8 bits")
            if windowed:  # into the stored range, as a viewer shows it
                arr = apply_voi_lut(arr, ds)
            arr = np.clip(np.asarray(arr, dtype=np.float64) / (2 ** bits - 1) * 255, 0, 255).round().astype(np.uint8)
        if photometric == "MONOCHROME1":  # 0 is white
            arr = 255 - arr
        arr = np.repeat(arr[..., None], 3, axis=2)
    # pydicom converts YBR_FULL(_422) to RGB itself (as_rgb); RGB stays as it is
    return np.ascontiguousarray(arr[..., :3].astype(np.uint8))


@lru_cache(maxsize=4096)
def facts(path: str | Path) -> dict:
    """What the header says that busi uses: patient (hashed PatientID, else StudyInstanceUID), scanner (manufacturer
    and model), mm per pixel (rows, columns) from the ultrasound region or PixelSpacing, frames, transfer syntax.
    Never a name, ID, birth date or accession number."""
    ds = _read(Path(path), pixels=False)
    patient = str(getattr(ds, "PatientID", "") or getattr(ds, "StudyInstanceUID", "") or "")
    scanner = " ".join(str(getattr(ds, k, "") or "").strip() for k in ("Manufacturer", "ManufacturerModelName")).strip()
    spacing = None
    for region in getattr(ds, "SequenceOfUltrasoundRegions", []) or []:
        if (getattr(region, "PhysicalUnitsXDirection", None) == CM_UNITS
                and getattr(region, "PhysicalUnitsYDirection", None) == CM_UNITS):
            spacing = (abs(float(region.PhysicalDeltaY)) * 10, abs(float(region.PhysicalDeltaX)) * 10)
            break
    if spacing is None and getattr(ds, "PixelSpacing", None):
        spacing = (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1]))
    syntax = ds.file_meta.get("TransferSyntaxUID") if getattr(ds, "file_meta", None) else None
    return {"patient": hashed(patient) if patient else None, "scanner": scanner or None, "mm_per_pixel": spacing,
            "frames": int(getattr(ds, "NumberOfFrames", 1) or 1),
            "transfer_syntax": getattr(syntax, "name", str(syntax)) if syntax else None}


def hashed(identifier: str) -> str:
    """A patient key that groups one patient's images within this run and cannot be turned back into the ID."""
    return "patient-" + hashlib.sha256(_SALT + identifier.encode("utf-8", "surrogateescape")).hexdigest()[:12]
