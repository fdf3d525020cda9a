"""Decoding any PNG/JPEG/BMP/TIFF safely into in-memory tensors, lesion masks, and augmenting batches."""
from __future__ import annotations

import math
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from . import preprocess
from .errors import BusiError
from .folders import BUSI_CLASSES, IMAGE_SUFFIXES, MASK_NAME, Dataset, Sample, is_dicom_file, scan  # noqa: F401 (re-exported)

# Ultrasound frames are well under a megapixel; anything this large is a mistake or a decompression bomb.
MAX_PIXELS = 64_000_000
MIN_SIDE = 8  # fewer pixels a side hold no scan (a 1x1 placeholder, an icon): skipped, not upscaled
DEEP_MODES = ("I;16", "I;16B", "I;16L", "I", "F")  # 16-bit and 32-bit greyscale: rescaled to 8 bits


def _to_rgb8(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; 16-bit and float images are rescaled, not clipped."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = a.max() if a.size else 0
        # 16-bit PNGs sometimes hold 8-bit values; only rescale when the range is really wider.
        if hi > 255:
            scale = 65535.0 if hi <= 65535 and a.min() >= 0 else hi
            a = a / scale * 255.0
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Composite on black (the ultrasound background) rather than letting alpha decide pixel values.
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return im.convert("RGB")


def open_image(path: str | Path, notes: list[str] | None = None, frame: int | None = None) -> Image.Image:
    """Decode one image file into an 8-bit RGB PIL image, or raise BusiError naming the file.

    notes, when given, collects what was unusual but usable ("16-bit"), for one warning over many images.
    """
    path = Path(path)
    if is_dicom_file(path):
        from .dicom import pixels
        im = Image.fromarray(pixels(path, frame, notes))
        w, h = im.size
        if w * h > MAX_PIXELS or min(w, h) < MIN_SIDE:
            raise BusiError(f"{path}: a DICOM image of {w}x{h} pixels: not a scan's size (at least {MIN_SIDE} a side, "
                            f"at most {MAX_PIXELS:,} pixels)")
        return im
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise BusiError(f"{path}: image too large ({w}x{h} pixels; the limit is {MAX_PIXELS:,})")
            if min(w, h) < MIN_SIDE:
                raise BusiError(f"{path}: image too small to be a scan ({w}x{h} pixels; at least {MIN_SIDE} a side)")
            if notes is not None and im.mode in DEEP_MODES:
                notes.append(f"{'16' if im.mode.startswith('I;16') else '32'}-bit greyscale, rescaled to 8 bits")
            im = ImageOps.exif_transpose(im)
            im.load()  # decode now, so a truncated file fails here and not later
            return _to_rgb8(im)
    except BusiError:
        raise
    except FileNotFoundError:
        raise BusiError(f"{path}: file does not exist") from None
    except IsADirectoryError:
        raise BusiError(f"{path}: is a folder, not an image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        detail = str(e).splitlines()[0].replace(f" '{path}'", "").replace(str(path), "this file") if str(e) else ""
        raise BusiError(f"{path}: not a readable image ({detail or type(e).__name__})") from None


def read_image(path: str | Path, size: int | None = None, notes: list[str] | None = None, steps=(),
               geometry: dict | None = None, frame: int | None = None, look=None) -> np.ndarray:
    """HxWx3 uint8 array, through the preprocessing steps (busi.preprocess) and resized to size x size (as the seed
    did, aspect ratio not kept) when size is given; geometry receives how the steps cut and padded it; look, a
    function, sees the image as decoded (to fingerprint it without decoding it twice)."""
    im = open_image(path, notes, frame)
    if look is not None:
        look(im)
    if steps:
        im = Image.fromarray(preprocess.apply(np.array(im), steps, geometry=geometry))
    if size is not None and notes is not None and min(im.size) < size:
        notes.append(f"smaller than the {size}-pixel model input, upscaled")
    if size is not None:
        im = im.resize((size, size), Image.BILINEAR)
    return np.array(im)


def model_input(image: np.ndarray, size: int) -> torch.Tensor:
    """An HxWx3 uint8 image as a 1x3xSxS uint8 batch, resized exactly as read_image(path, size) resizes."""
    resized = np.array(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    return torch.from_numpy(resized).permute(2, 0, 1)[None]


def mask_pixels(path: str | Path) -> np.ndarray:
    """One lesion-mask file as a bool HxW array, whatever its form: 0/255 or 0/1 greyscale, 1-bit, RGBA, or colour
    per class (one public set draws malignant lesions pure red, benign pure green, which a grey-level threshold would
    read as empty): a pixel is lesion where any channel is bright, or non-zero in a 0/1 mask."""
    rgb = np.asarray(open_image(path))
    brightest = rgb.max(2)
    return brightest > (0 if brightest.max() <= 1 else 127)


def read_mask(paths: list[str | Path] | tuple[str | Path, ...], size: int | None = None) -> np.ndarray | None:
    """Union of an image's lesion masks as a bool array, resized to size x size when given (None without masks)."""
    union = None
    for p in paths:
        m = mask_pixels(p)
        if size is not None:
            m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)) > 127
        if union is not None and union.shape != m.shape:
            raise BusiError(f"{p}: mask size {m.shape[1]}x{m.shape[0]} differs from the image's other masks")
        union = m if union is None else union | m
    return union


def _decode(dataset: Dataset, sample: Sample, image_size: int, steps, geometry: dict | None, look=None):
    """(HxWx3 uint8 array or None, the error or None, notes on what was unusual about it)."""
    notes: list[str] = []
    try:
        cut = {} if geometry is not None else None
        image = read_image(dataset.file(sample), image_size, notes, steps, cut, dataset.frame(sample),
                           None if look is None else lambda im: look(sample, im))
        if cut:  # steps that cut or padded it
            geometry[sample.path] = cut
        return image, None, notes
    except BusiError as e:
        return None, str(e), notes


def batches(dataset: Dataset, image_size: int, batch_size: int = 32, steps=(), geometry: dict | None = None,
            skipped: dict | None = None, progress: bool = True, desc: str = "decoding images", look=None):
    """Yield (uint8 Bx3xSxS images, int64 labels, their samples) batch by batch, decoded by threads a batch or two
    ahead of the caller (who runs the network meanwhile), so a folder of any size holds only a few batches in memory.

    Unreadable images are left out with a warning that names them, and recorded in skipped; unusual ones (grayscale,
    16-bit, upscaled) get one line per kind at the end. geometry, a dict, receives per image path how the steps cut it
    (for load_masks, which then need not decode the images again); look(sample, PIL image) sees each image as decoded."""
    skipped = {} if skipped is None else skipped
    unusual: dict[str, list[str]] = {}
    ahead = deque()
    samples = iter(dataset.samples)
    bar = tqdm(total=len(dataset.samples), desc=desc, disable=not progress, leave=False)
    with ThreadPoolExecutor(max_workers=4) as pool:  # PIL and OpenCV release the GIL while decoding and cleaning
        def refill():
            while len(ahead) < 2 * batch_size and (sample := next(samples, None)) is not None:
                ahead.append((sample, pool.submit(_decode, dataset, sample, image_size, steps, geometry, look)))
        refill()
        while ahead:
            rows, kept = [], []
            while ahead and len(rows) < batch_size:
                sample, future = ahead.popleft()
                arr, err, notes = future.result()
                refill()
                bar.update()
                for note in notes:
                    unusual.setdefault(note, []).append(sample.path)
                if err is None:
                    rows.append(torch.from_numpy(arr).permute(2, 0, 1))
                    kept.append(sample)
                else:
                    skipped[sample.path] = err
                    warn(f"skipping {err}")
            if kept:
                yield torch.stack(rows), torch.tensor([s.label for s in kept], dtype=torch.int64), kept
    bar.close()
    for note, paths in unusual.items():  # one line per kind, not one per image
        more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
        warn(f"{len(paths)} image(s) {note}: {', '.join(paths[:3])}{more}")


def load(dataset: Dataset, image_size: int, progress: bool = True, steps=(), geometry: dict | None = None
         ) -> tuple[torch.Tensor, torch.Tensor, Dataset]:
    """Decode, preprocess and resize every image once into memory (for training, which needs them all): (uint8
    Nx3xSxS, int64 labels, the dataset minus failures). geometry: as for batches.

    Unreadable images are dropped with a warning that names them, and recorded in the dataset's `skipped`.
    """
    # each batch goes straight into its rows: one copy of the folder in memory, not a list, a stack and a transpose
    images = torch.empty(len(dataset.samples), 3, image_size, image_size, dtype=torch.uint8)
    kept, skipped, n = [], dict(dataset.skipped), 0
    for part, _, samples in batches(dataset, image_size, 64, steps, geometry, skipped, progress):
        images[n:n + len(part)] = part
        n += len(part)
        kept += samples
    if not kept:
        raise BusiError(f"{dataset.root}: none of the images could be read")
    labels = torch.tensor([s.label for s in kept], dtype=torch.int64)
    return images[:n], labels, dataset.with_samples(kept, skipped)


class Rows:
    """Rows of a per-image tensor made only when asked for (a gallery's few images read again from their folder)
    instead of a whole folder held in memory; indexed as that tensor would be: an int, a list of ints, (int, ...)."""

    def __init__(self, n: int, make):
        self.n, self.make, self.made = n, make, {}  # make: list of row numbers -> tensor of those rows

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):
        if isinstance(index, tuple):
            return self[index[0]][index[1:]]
        if not isinstance(index, (list, range)):
            return self[[int(index)]][0]
        wanted = [int(i) for i in index if int(i) not in self.made]
        if wanted:
            self.made.update(zip(wanted, self.make(wanted)))
        return torch.stack([self.made[int(i)] for i in index]) if len(index) else torch.empty(0)


def reread(dataset: Dataset, image_size: int, steps=()) -> Rows:
    """The dataset's images as Rows, decoded again when asked for (every one was readable once: an image that has
    become unreadable since is a one-line error)."""
    def one(i: int) -> torch.Tensor:
        arr, err, _ = _decode(dataset, dataset.samples[i], image_size, steps, None)
        if err is not None:
            raise BusiError(f"{err} (it was readable a moment ago)")
        return torch.from_numpy(arr).permute(2, 0, 1)

    def make(rows: list[int]) -> torch.Tensor:
        with ThreadPoolExecutor(max_workers=4) as pool:
            return torch.stack(list(pool.map(one, rows)))
    return Rows(len(dataset.samples), make)


MASK_USABLE = ("lesion", "empty")
MASK_STATUSES = ("lesion", "empty", "missing", "size_mismatch", "unreadable", "all_lesion")
ALL_LESION = 0.95  # a mask covering this share of its image outlines no lesion (an inverted or blank-white file)
MASK_PROBLEMS = {"size_mismatch": "a size other than its image's", "unreadable": "not a readable image",
                 "all_lesion": f"marks over {ALL_LESION:.0%} of the image as lesion (inverted?)"}


def mask_status_counts(status: list[str]) -> dict[str, int]:
    """How many images had each mask status: reported so that no unusable mask is dropped silently."""
    return {k: status.count(k) for k in MASK_STATUSES}


def load_masks(dataset: Dataset, image_size: int, steps=(), geometry: dict | None = None, report: bool = True
               ) -> tuple[torch.Tensor, list[str]]:
    """(uint8 Nx1xSxS lesion masks, cropped as the images are when steps crop them; a status per image). geometry:
    what load recorded of each image's crop (else the images are decoded again to find it). report: warn about unusable
    masks here (else the caller does, with report_mask_problems, once for all its batches).

    Status: 'lesion', 'empty' (all black, as for normal images), 'missing' (no mask file), 'size_mismatch'
    (mask and image differ in size, so it cannot be trusted to line up) or 'unreadable'. Only the first two
    are usable; the others are counted and never taken to mean 'no lesion'.
    """
    def one(sample: Sample) -> tuple[str, np.ndarray | None]:
        if not sample.mask_paths:
            return "missing", None
        try:
            cut = (geometry or {}).get(sample.path)
            if cut is not None:
                image_size_px = cut["size"][::-1]  # (width, height), as PIL says it
            else:
                with Image.open(dataset.file(sample)) as im:
                    image_size_px = im.size
            sizes = set()
            for p in sample.mask_paths:
                with Image.open(dataset.file(p)) as m:
                    sizes.add(m.size)
            if sizes != {image_size_px}:
                return "size_mismatch", None
            if any(s in preprocess.GEOMETRIC for s in steps):  # cut and padded as its image is, then resized
                full = read_mask([dataset.file(p) for p in sample.mask_paths])
                if cut is not None:
                    full = preprocess.apply_geometry(full, cut)
                else:  # only the steps that move pixels: the mask needs the image's geometry, not its clean-up
                    geometric = [s for s in steps if s in preprocess.GEOMETRIC]
                    _, full = preprocess.apply(np.array(open_image(dataset.file(sample))), geometric, mask=full)
                union = np.asarray(Image.fromarray(full.astype(np.uint8) * 255).resize((image_size, image_size),
                                                                                         Image.NEAREST)) > 127
            else:
                union = read_mask([dataset.file(p) for p in sample.mask_paths], image_size)
        except (BusiError, OSError):
            return "unreadable", None
        if union.mean() > ALL_LESION:
            return "all_lesion", None
        return ("lesion" if union.any() else "empty"), union

    masks = torch.zeros(len(dataset.samples), 1, image_size, image_size, dtype=torch.uint8)
    status = []
    with ThreadPoolExecutor(max_workers=4) as pool:  # decoding and OpenCV release the GIL: both cores work
        for i, (kind, union) in enumerate(pool.map(one, dataset.samples)):
            status.append(kind)
            if union is not None:
                masks[i, 0] = torch.from_numpy(union.astype(np.uint8))
    if report:
        report_mask_problems(dataset.samples, status)
    return masks, status


def report_mask_problems(samples: list[Sample], status: list[str]) -> None:
    """One line per kind of unusable mask, naming the files."""
    for kind, problem in MASK_PROBLEMS.items():  # one line per kind, naming the files; their images still classify
        named = [sample.mask_paths[0] for sample, st in zip(samples, status) if st == kind]
        if named:
            more = f" and {len(named) - 3} more" if len(named) > 3 else ""
            warn(f"{len(named)} lesion mask(s) {problem}, not used (their images still are): "
                 f"{', '.join(map(str, named[:3]))}{more}")


def warn(message: str) -> None:
    tqdm.write(f"busi: warning: {message}", file=sys.stderr)  # stderr: stdout stays the results, for pipes


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (or [0,1] float) NCHW -> float normalised by mean/std, on the images' device."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def augment(images: torch.Tensor, masks: torch.Tensor | None = None, flip_p: float = 0.5, max_rotation: float = 10.0,
            autocontrast_p: float = 0.5, min_scale: float = 1.0, brightness: float = 0.0, contrast: float = 0.0,
            ultrasound_p: float = 0.0, generator: torch.Generator | None = None):
    """Train-time augmentation drawn per image but computed on the whole batch at once, on the batch's device.

    The seed's three (horizontal flip, rotation, autocontrast), plus optional zoom-and-shift (a random crop
    covering at least `min_scale` of each side) and brightness/contrast jitter. uint8 NCHW in, float [0,1]
    out. Masks (float N1HW), when given, get the same flip, rotation and crop, and are returned too. ultrasound_p > 0
    adds what differs between scanners and settings (ultrasound_like).
    """
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.clone()
    n, device = x.shape[0], x.device

    def draw(*shape):  # drawn on the CPU so a seeded generator gives the same batch on any device
        return torch.rand(*shape, generator=generator).to(device)

    if autocontrast_p > 0:
        # per image and channel: stretch [min, max] to [0, 1]; constant channels stay as they are
        lo = x.amin(dim=(2, 3), keepdim=True)
        hi = x.amax(dim=(2, 3), keepdim=True)
        stretched = torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x)
        x = torch.where(draw(n, 1, 1, 1) < autocontrast_p, stretched, x)
    if brightness > 0 or contrast > 0:
        gain = 1 + (draw(n, 1, 1, 1) * 2 - 1) * contrast
        offset = (draw(n, 1, 1, 1) * 2 - 1) * brightness
        x = ((x - 0.5) * gain + 0.5 + offset).clamp(0, 1)
    if ultrasound_p > 0:
        x = ultrasound_like(x, ultrasound_p, draw, generator)
    if flip_p > 0:
        flip = draw(n, 1, 1, 1) < flip_p
        x = torch.where(flip, x.flip(-1), x)
        masks = None if masks is None else torch.where(flip, masks.flip(-1), masks)
    if max_rotation > 0 or min_scale < 1:
        # one affine per image: output pixel -> input pixel, in grid_sample's [-1, 1] coordinates
        angle = (draw(n) * 2 - 1) * math.radians(max_rotation)
        scale = min_scale + draw(n) * (1 - min_scale)  # < 1 samples a smaller window: a zoom in
        shift = (draw(n, 2) * 2 - 1) * (1 - scale)[:, None]  # keeps the window inside the image
        cos, sin = angle.cos() * scale, angle.sin() * scale
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if masks is not None:
            masks = F.grid_sample(masks.float(), grid.to(masks.device), mode="bilinear", padding_mode="zeros", align_corners=False)
    return x if masks is None else (x, masks)


def lesion_windows(images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, p: float, normal: int,
                   sides: tuple[float, float] = (0.4, 0.6), margin: int = 8,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """With chance p per image whose lesion mask is known, a square window of 40-60% of the side, resized back to the
    full size: half of the time one clear of the lesion (and `margin` pixels around it), labelled `normal`; else one
    that holds the whole lesion, keeping the image's label. A normal image's window stays normal.

    Why: with normal scans from one hospital only, 'normal' becomes that hospital's look; lesion-free views of every
    source's lesion images teach 'no lesion in view' instead. The lesion windows keep zoom from being the cue.
    uint8 or [0, 1] float NCHW images, labels, float N1HW masks (negative: unknown) -> (float images, labels, masks).
    """
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.clone()
    y, m = labels.clone(), masks.clone()
    n, _, size, _ = x.shape
    chosen = (torch.rand(n, generator=generator) < p) & (masks.amin(dim=(1, 2, 3)) >= 0).cpu()
    if not chosen.any():
        return x, y, m
    lesion = F.max_pool2d(masks.clamp_min(0), 2 * margin + 1, 1, margin) > 0.5  # dilated: a margin round the lesion
    for i in chosen.nonzero().flatten().tolist():
        side = round(size * (sides[0] + (sides[1] - sides[0]) * float(torch.rand(1, generator=generator))))
        grid = F.pad(lesion[i, 0].float().cumsum(0).cumsum(1), (1, 0, 1, 0))  # integral image
        inside = grid[side:, side:] - grid[:-side, side:] - grid[side:, :-side] + grid[:-side, :-side]
        total = grid[-1, -1]
        free = bool(total == 0) or float(torch.rand(1, generator=generator)) < 0.5
        fits = (inside == 0) if free else (inside >= total)
        where = fits.nonzero()
        if len(where) == 0:  # no such window in this image: it trains as it is
            continue
        top, left = where[int(torch.randint(len(where), (1,), generator=generator))].tolist()
        window = (slice(None), slice(top, top + side), slice(left, left + side))
        x[i] = F.interpolate(x[i][window][None], size=(size, size), mode="bilinear", align_corners=False)[0]
        m[i] = F.interpolate(m[i][window][None], size=(size, size), mode="nearest")[0]
        if free:
            y[i] = normal
    return x, y, m


def ultrasound_like(x: torch.Tensor, p: float, draw, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each with chance p per image: gain (gamma 1/1.6 to 1.6), depth attenuation (the bottom at 50-100% of the top),
    blur (Gaussian, sigma 1 px: a coarser transducer) and speckle (multiplicative, smoothed grain, 10-30%).

    Float [0, 1] NCHW in and out; the same change on every channel, so grey stays grey.
    """
    n, c, h, w = x.shape
    device = x.device
    chosen = lambda: draw(n, 1, 1, 1) < p  # noqa: E731
    gamma = torch.exp((draw(n, 1, 1, 1) * 2 - 1) * math.log(1.6))
    x = torch.where(chosen(), x.clamp_min(1e-6) ** gamma, x)
    bottom = 0.5 + 0.5 * draw(n, 1, 1, 1)
    depth = torch.linspace(0, 1, h, device=device, dtype=x.dtype).view(1, 1, h, 1)
    x = torch.where(chosen(), x * (1 - (1 - bottom) * depth), x)
    taps = torch.exp(-torch.arange(-2, 3, device=device, dtype=x.dtype) ** 2 / 2)
    taps = taps / taps.sum()
    blurred = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), taps.view(1, 1, 1, 5).expand(c, 1, 1, 5), groups=c)
    blurred = F.conv2d(F.pad(blurred, (0, 0, 2, 2), mode="replicate"), taps.view(1, 1, 5, 1).expand(c, 1, 5, 1), groups=c)
    x = torch.where(chosen(), blurred, x)
    grain = F.avg_pool2d(torch.randn(n, 1, h, w, generator=generator).to(device, x.dtype), 3, 1, 1) * 3  # unit spread
    strength = 0.1 + 0.2 * draw(n, 1, 1, 1)
    x = torch.where(chosen(), x * (1 + strength * grain), x)
    return x.clamp(0, 1)
