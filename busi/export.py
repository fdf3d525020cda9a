"""Exporting a checkpoint to ONNX or TorchScript with its preprocessing and class names, and running the result."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from . import shift
from .errors import BusiError
from .models import has_segmenter

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
METADATA_KEY = "busi"


class Deployable(nn.Module):
    """uint8 images N x 3 x S x S in, class probabilities out: normalisation, mirror TTA and temperature inside. A
    model with a lesion segmenter also returns its lesion probability maps (N x 1 x H x W), which the lesion-first
    rule and the outline need."""

    def __init__(self, model: nn.Module, config: dict):
        super().__init__()
        self.model = model.eval()
        self.register_buffer("mean", torch.tensor(config["mean"]).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(config["std"]).view(1, 3, 1, 1) * 255.0)
        self.temperature = float(config.get("temperature", 1.0))
        self.tta = bool(config.get("tta", False))
        self.segments = has_segmenter(model)

    def _one(self, x):
        if not self.segments:
            return self.model(x), None
        logits, lesion = self.model.forward_with_lesion(x)
        return logits, torch.sigmoid(lesion)

    def passes(self, images: torch.Tensor, features: list | None = None):
        """(raw scores, lesion probabilities or None), the mirrored pass averaged in; features, a list, receives what
        the classifier's last layer reads on the unmirrored pass (busi.shift's features)."""
        x = (images.float() - self.mean) / self.std
        hook = None
        if features is not None:
            hook = shift._last_layer(self.model)[1].register_forward_hook(
                lambda module, inputs, output: features.append(inputs[0]))
        logits, lesion = self._one(x)
        if hook is not None:
            hook.remove()
        if self.tta:
            logits_m, lesion_m = self._one(x.flip(-1))
            logits = (logits + logits_m) / 2
            lesion = None if lesion is None else (lesion + lesion_m.flip(-1)) / 2
        return logits, lesion

    def forward(self, images: torch.Tensor):
        logits, lesion = self.passes(images)
        probs = torch.softmax(logits / self.temperature, dim=1)
        return probs if lesion is None else (probs, lesion)


def onnx_session(path: str | Path):
    """An ONNX Runtime session on the CPU without its memory arena (which keeps every batch size's buffers: a gigabyte
    more at 2,000 images, and no faster)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3  # its warnings about unused initialisers say nothing to a user
    options.enable_cpu_mem_arena = False
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export(checkpoint_path: str | Path, fmt: str, out: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write the model as ONNX (run with onnxruntime) or TorchScript; nothing is left behind on failure."""
    if fmt not in FORMATS:
        raise BusiError(f"export format '{fmt}' is not supported (choose {' or '.join(FORMATS)})")
    if is_exported(checkpoint_path):
        raise BusiError(f"{checkpoint_path}: busi export needs the checkpoint.pth, not an exported model")
    from . import checkpoint  # read here, not through busi.inference, which runs exports through this module
    model, config = checkpoint.load(checkpoint_path)
    out = Path(out) if out else Path(checkpoint_path).with_suffix(FORMATS[fmt])
    if out.exists() and not overwrite:
        raise BusiError(f"{out}: already exists; pass --overwrite to replace it")
    wrapped = Deployable(model, config).eval()
    side = config["image_size"]
    example = torch.zeros(2, 3, side, side, dtype=torch.uint8)
    steps = config.get("preprocess") or []
    before = (f"; each image first through busi.preprocess.apply(image, {steps}) (OpenCV: outside the graph), then "
              "resized" if steps else "")
    kept = {k: v for k, v in config.items() if k != "fingerprint_paths"}  # the names of its training images stay home
    metadata = json.dumps({**kept, "format": fmt, "input": f"uint8 N x 3 x {side} x {side} RGB{before}",
                           "output": "probabilities, lesion map (N x 1 x H x W)" if wrapped.segments
                           else "probabilities"})
    tmp = out.with_name(out.name + ".partial")
    try:
        if fmt == "onnx":
            _export_onnx(wrapped, example, tmp, metadata)
        else:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, yet still what many viewers load
                warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the input size is fixed: no branch to miss
                scripted = torch.jit.trace(wrapped, example)
                torch.jit.save(scripted, str(tmp), _extra_files={f"{METADATA_KEY}.json": metadata})
        os.replace(tmp, out)
    except BusiError:
        raise
    except Exception as e:
        raise BusiError(f"{out}: export to {fmt} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".data")):
            leftover.unlink(missing_ok=True)
    return out


def _export_onnx(wrapped: nn.Module, example: torch.Tensor, path: Path, metadata: str) -> None:
    try:
        import onnx
    except ImportError:
        raise BusiError('ONNX export needs: pip install -e ".[export]"') from None
    import io
    import contextlib

    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates every step
        outputs = ["probabilities", "lesion"] if wrapped.segments else ["probabilities"]
        program = torch.onnx.export(wrapped, (example,), input_names=["images"], output_names=outputs,
                                    dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=4096)}},
                                    dynamo=True, external_data=False)
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, metadata
    onnx.save(proto, str(path))


class ExportedModel:
    """An exported file loaded for prediction: config from its metadata, probabilities from uint8 images."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise BusiError(f"{self.path}: exported model does not exist")
        try:
            if self.path.suffix == ".onnx":
                self._load_onnx()
            else:
                extra = {f"{METADATA_KEY}.json": ""}
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    self.module = torch.jit.load(str(self.path), map_location="cpu", _extra_files=extra)
                self.config = json.loads(extra[f"{METADATA_KEY}.json"])
        except BusiError:
            raise
        except Exception as e:
            raise BusiError(f"{self.path}: not a readable exported busi model ({type(e).__name__})") from None

    def _load_onnx(self):
        try:
            import onnxruntime  # noqa: F401  (absent: the one line below, not a traceback from onnx_session)
        except ImportError:
            raise BusiError('running ONNX models needs onnxruntime: pip install -e ".[export]"') from None
        self.session = onnx_session(self.path)
        meta = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise BusiError(f"{self.path}: an ONNX model, but not one exported by busi (no class names inside)")
        self.config = json.loads(meta[METADATA_KEY])
        self.module = None

    def outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(class probabilities, lesion probability maps or None) of uint8 images."""
        if self.module is not None:
            with torch.no_grad():
                out = self.module(images)
            out = out if isinstance(out, tuple) else (out,)
        else:
            out = tuple(torch.from_numpy(o) for o in self.session.run(None, {"images": images.numpy()}))
        return out[0].float(), (out[1].float() if len(out) > 1 else None)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return self.outputs(images)[0]


def is_exported(path: str | Path) -> bool:
    return Path(path).suffix in (".onnx", ".pt", ".ts")
