"""A checkpoint's network under ONNX Runtime where it is installed: exported once per checkpoint into a cache, checked
there against PyTorch, then run with the same outputs (raw scores, lesion maps, the shift check's features)."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .errors import BusiError
from .export import Deployable, onnx_session
from .models import has_segmenter
from .runs import cache_dir

ENGINES = ("auto", "torch", "onnx")
AUTO_EXPORT_MIN = 500  # auto exports a checkpoint for ONNX Runtime (a minute, once) for this many images or more …
AUTO_CACHED_MIN = 16  # … and runs an export already cached for this many or more
TOLERANCE = 1e-5  # the largest difference in a class probability accepted between the two engines
EXPORT_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


class Graph(Deployable):
    """uint8 N x 3 x S x S in; out: raw scores (mirrored pass averaged in, as outputs_of does), what the classifier's
    last layer reads on the unmirrored pass (busi.shift) and, for models with a segmenter, lesion probabilities."""

    def forward(self, images: torch.Tensor):
        seen: list = []
        logits, lesion = self.passes(images, seen)
        return (logits, seen[0]) if lesion is None else (logits, seen[0], lesion)


def available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in EXPORT_PACKAGES)


def choose(engine: str, n_images: int, checkpoint_path: str | Path | None = None) -> str:
    """'torch' or 'onnx' for a run over n_images: auto takes ONNX Runtime where installed, when this checkpoint's
    export is cached or the folder is large enough to pay for exporting it."""
    if engine not in ENGINES:
        raise BusiError(f"--engine must be one of {', '.join(ENGINES)}, got '{engine}'")
    if engine == "onnx" and not available():
        raise BusiError('--engine onnx needs ONNX Runtime and the exporter: pip install -e ".[export]"')
    if engine == "auto":
        if not available() or n_images < AUTO_CACHED_MIN:
            return "torch"
        cached = checkpoint_path is not None and cached_path(checkpoint_path).is_file()
        return "onnx" if cached or n_images >= AUTO_EXPORT_MIN else "torch"
    return engine


def cached_path(checkpoint_path: str | Path) -> Path:
    """Where a checkpoint's export lives: named by its bytes and the versions that made the graph."""
    digest = hashlib.sha256()
    with open(checkpoint_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    import onnxruntime
    versions = f"busi{__version__}-torch{torch.__version__.split('+')[0]}-ort{onnxruntime.__version__}"
    return cache_dir() / f"{digest.hexdigest()[:20]}-{versions}.onnx"


class OnnxEngine:
    """The checkpoint's Graph as an ONNX Runtime session; exported (and checked) on first use, cached after."""

    def __init__(self, checkpoint_path: str | Path, model: nn.Module, config: dict):
        self.segments = has_segmenter(model)
        path = cached_path(checkpoint_path)
        if not path.is_file():
            _export(Graph(model, config), config, path)
        self.session = onnx_session(path)
        self.path = path

    def run(self, images: torch.Tensor, batch_size: int = 32):
        """(raw scores, lesion maps float16 or None, features) of uint8 NCHW images, in batches."""
        parts = [self.session.run(None, {"images": images[i:i + batch_size].numpy()})
                 for i in range(0, len(images), batch_size)]
        logits = torch.from_numpy(np.concatenate([p[0] for p in parts])).float()
        feats = torch.from_numpy(np.concatenate([p[1] for p in parts])).float()
        maps = torch.from_numpy(np.concatenate([p[2] for p in parts])).half() if self.segments else None
        return logits, maps, feats


def _export(graph: Graph, config: dict, path: Path) -> None:
    """Export, then compare with PyTorch on a batch of random images; nothing is cached unless they agree."""
    # said even with --no-progress: a minute without output would look like a hang
    print("busi: preparing the model for ONNX Runtime, once for this checkpoint (about a minute on two cores; "
          f"cached in {path.parent}, which is safe to delete; --engine torch skips it)", file=sys.stderr, flush=True)
    side = config["image_size"]
    example = torch.randint(0, 256, (4, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    outputs = ["logits", "features", "lesion"] if graph.segments else ["logits", "features"]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(graph, (example[:2],), input_names=["images"], output_names=outputs,
                                        dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=4096)}},
                                        dynamo=True, external_data=False)
            import onnx
            onnx.save(program.model_proto, str(partial))
            expected = graph(example)
        got = onnx_session(partial).run(None, {"images": example.numpy()})
        temperature = float(config.get("temperature", 1.0))
        gap = float((torch.softmax(torch.from_numpy(got[0]) / temperature, 1)
                     - torch.softmax(expected[0] / temperature, 1)).abs().max())
        if gap > TOLERANCE:
            raise BusiError(f"ONNX Runtime's probabilities differ from PyTorch's by {gap:.1e} (more than {TOLERANCE:.0e}) "
                            "on this model: run it with --engine torch")
        os.replace(partial, path)
    except BusiError:
        raise
    except Exception as e:
        raise BusiError(f"this model could not be prepared for ONNX Runtime ({type(e).__name__}): run it with "
                        "--engine torch") from None
    finally:
        partial.unlink(missing_ok=True)
