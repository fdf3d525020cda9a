"""Image clean-up applied before resizing, in training and in every prediction: scan crop, overlays out, CLAHE, padding."""
from __future__ import annotations

import cv2
import numpy as np

STEPS = ("crop", "overlays", "clahe", "pad")
GEOMETRIC = ("crop", "pad")  # the steps a lesion mask must follow

# Burned-in calipers, dotted measuring lines and text are bright strokes a few pixels wide: a white top-hat
# (the image minus its opening) keeps structures narrower than the kernel, and real tissue is seldom both that
# narrow, that much brighter than its surroundings and that bright. Thresholds were read off busi_dev images
# with calipers and text (tests draw both on a synthetic scan).
STROKE_KERNEL = 7
STROKE_CONTRAST = 90  # top-hat response, out of 255
STROKE_BRIGHTNESS = 170
COLOUR_SPREAD = 40  # an ultrasound scan is grey; pixels whose channels differ this much are markers
# Rows and columns darker than this on average hold no scan (the black margin around it).
MARGIN_LEVEL = 8
MIN_CROP_SHARE = 0.03  # trim only margins of at least this share of a side: a darker edge of tissue stays


def overlay_mask(image: np.ndarray) -> np.ndarray:
    """bool HxW: pixels of burned-in markers and text (thin bright strokes, or coloured pixels)."""
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (STROKE_KERNEL, STROKE_KERNEL))
    tophat = cv2.morphologyEx(gray, cv2.MORPH_TOPHAT, kernel)
    strokes = (tophat > STROKE_CONTRAST) & (gray >= STROKE_BRIGHTNESS)
    # OpenCV's per-channel max and min: 20x faster than numpy's reductions over the channel axis, the same pixels
    r, g, b = cv2.split(np.ascontiguousarray(image))
    colour = cv2.subtract(cv2.max(cv2.max(r, g), b), cv2.min(cv2.min(r, g), b)) > COLOUR_SPREAD
    return strokes | colour


def remove_overlays(image: np.ndarray) -> np.ndarray:
    """Markers and text painted over from their surroundings; an image without any comes back unchanged."""
    mask = overlay_mask(image)
    if not mask.any():
        return image
    # the strokes' anti-aliased rims are a pixel or two wider than the threshold finds
    grown = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=1)
    return cv2.inpaint(image, grown, 3, cv2.INPAINT_TELEA)


def _longest_run(bright: np.ndarray) -> tuple[int, int]:
    best, start, span = (0, len(bright)), None, -1
    for i, b in enumerate(np.append(bright, False)):
        if b and start is None:
            start = i
        elif not b and start is not None:
            if i - start > span:
                best, span = (start, i), i - start
            start = None
    return best


def scan_box(image: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the scan region: black margins (and the interface text on them) left out."""
    gray = cv2.cvtColor(remove_overlays(image), cv2.COLOR_RGB2GRAY).astype(np.float32)
    h, w = gray.shape
    top, bottom = _longest_run(gray.mean(1) > MARGIN_LEVEL)
    left, right = _longest_run(gray.mean(0) > MARGIN_LEVEL)
    if bottom - top < h / 3 or right - left < w / 3:  # a mostly dark image: nothing to trust, keep it whole
        return 0, h, 0, w
    top = top if top >= MIN_CROP_SHARE * h else 0
    bottom = bottom if h - bottom >= MIN_CROP_SHARE * h else h
    left = left if left >= MIN_CROP_SHARE * w else 0
    right = right if w - right >= MIN_CROP_SHARE * w else w
    return top, bottom, left, right


def pad_box(image: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) black rows and columns that make the image square, centred."""
    h, w = image.shape[:2]
    extra_h, extra_w = max(0, w - h), max(0, h - w)
    return extra_h // 2, extra_h - extra_h // 2, extra_w // 2, extra_w - extra_w // 2


def clahe(image: np.ndarray) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of the grey levels: gain and dynamic range made alike."""
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    out = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(gray)
    return cv2.cvtColor(out, cv2.COLOR_GRAY2RGB)


def apply_geometry(mask: np.ndarray, geometry: dict) -> np.ndarray:
    """A mask (HxW, its image's size) cut and padded as apply cut and padded its image (geometry: what apply wrote)."""
    if "crop" in geometry:
        top, bottom, left, right = geometry["crop"]
        mask = mask[top:bottom, left:right]
    if "pad" in geometry:
        top, bottom, left, right = geometry["pad"]
        mask = np.pad(mask, ((top, bottom), (left, right)))
    return np.ascontiguousarray(mask)


def apply(image: np.ndarray, steps, mask: np.ndarray | None = None, origin: list | None = None,
          geometry: dict | None = None):
    """HxWx3 uint8 through the named steps, in the fixed order crop, overlays, clahe, pad.

    pad makes the image square with black borders, so that resizing to the square model input keeps its proportions
    (a lesion's height-to-width ratio is a sign of malignancy, and scanners' frames differ in shape). A mask (HxW, the
    image's size) given too gets the same crop and padding, and (image, mask) is returned. origin, a list, receives the
    (row, column) of the result's top-left pixel in the given image (negative where padding was added), so that what a
    model finds in the result can be placed on the file's image. geometry, a dict, receives the crop and pad boxes and
    the given image's size, for apply_geometry to cut masks later without decoding the image again.
    """
    if geometry is not None:
        geometry["size"] = image.shape[:2]
    row = col = 0
    for step in STEPS:
        if step not in steps:
            continue
        if step == "crop":
            top, bottom, left, right = scan_box(image)
            if geometry is not None:
                geometry["crop"] = (top, bottom, left, right)
            image = image[top:bottom, left:right]
            mask = None if mask is None else mask[top:bottom, left:right]
            row, col = row + top, col + left
        elif step == "pad":
            top, bottom, left, right = pad_box(image)
            if geometry is not None:
                geometry["pad"] = (top, bottom, left, right)
            image = np.pad(image, ((top, bottom), (left, right), (0, 0)))
            mask = None if mask is None else np.pad(mask, ((top, bottom), (left, right)))
            row, col = row - top, col - left
        else:
            image = {"overlays": remove_overlays, "clahe": clahe}[step](image)
    image = np.ascontiguousarray(image)
    if origin is not None:
        origin[:] = [row, col]
    return image if mask is None else (image, np.ascontiguousarray(mask))
