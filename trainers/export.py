"""`export_checkpoint`: a checkpoint's encoder as files other tools load without selfsup.

    <out>/model.safetensors    safetensors: the encoder's weights under selfsup's names (encoder.pt's)
    <out>/model.safetensors    timm: timm's names; `timm.create_model("local-dir:<out>", pretrained=True)`
                               builds and loads it (or create_model(architecture, **model_args) + load_state_dict)
    <out>/model.torchscript.pt torchscript: traced; torch.jit.load(path)(x) → features [B, D]
    <out>/model.onnx           onnx: the dynamo exporter, batch axis dynamic (needs the `export` extra)
    <out>/config.json          written last: {"selfsup": {format, files, architecture, modality, input
                               (shape, layout, scale, mean, std), out_dim, checkpoint, step, check}} —
                               for timm also timm's own hub keys (architecture, model_args, pretrained_cfg)

Every export is checked before anything is written: the artifact read back (the weights in a fresh
model, the traced program, an onnxruntime session) gives the encoder's features on a random batch of
the eval input shape, at another batch size than the one traced, within TOLERANCE.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np
import torch
from torch import nn

from selfsup.pipeline import storage
from selfsup.pipeline.registry import Registry
from selfsup.trainers.backbones import backbone_from_spec
from selfsup.trainers.backbones.timm_layout import timm_layout
from selfsup.trainers.encoder import load_encoder
from selfsup.trainers.inputs import MEDIA_FIELDS, applied_norm, eval_sample, to_device

CONFIG = "config.json"
TOLERANCE = 1e-4  # max |exported - encoder| allowed, relative to max(1, max |encoder features|)
TRACE_BATCH, CHECK_BATCH = 2, 3
EXPORT_EXTRA = "pip install 'selfsup[export]'"


@dataclass(frozen=True)
class Artifact:
    """A format's files (name → bytes), its config.json keys, and how to run features from the files."""

    files: dict[str, bytes]
    config: dict[str, Any]
    features: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Exported:
    """What `export_checkpoint` wrote: file URLs (config.json last) and the numerical check."""

    files: list[str]
    max_abs_diff: float
    config: dict[str, Any]


Writer = Callable[[nn.Module, Mapping[str, Any], torch.Tensor], Artifact]
FORMATS: Registry[Writer] = Registry("export format")


def example_input(meta: Mapping[str, Any], batch: int, seed: int) -> torch.Tensor:
    """A random batch [B, ...] of the eval input, through the sample path's conversion and normalization."""
    sample = eval_sample(str(meta.get("modality", "image")), meta.get("modality_args") or {})
    field = next((f for f in MEDIA_FIELDS if isinstance(sample.get(f), np.ndarray)), None)
    if field is None:
        raise ValueError(f"the {meta.get('modality')} eval sample holds none of {MEDIA_FIELDS}; nothing to trace")
    rng = np.random.default_rng(seed)
    shape = (batch, *sample[field].shape)
    if sample[field].dtype == np.uint8:
        values = rng.integers(0, 256, shape, dtype=np.uint8)
    else:
        values = rng.standard_normal(shape).astype(sample[field].dtype)
    return to_device({field: values}, torch.device("cpu"), meta.get("mean"), meta.get("std"))[field]


def export_checkpoint(path: str, out: str, fmt: str, options: Optional[Mapping[str, Any]] = None) -> Exported:
    """Export the encoder of checkpoint (or run) `path` to folder `out` in format `fmt`; see the module doc.

    Raises ValueError naming the format or architecture that cannot be exported, or a failed check.
    """
    writer = FORMATS.get(fmt)
    encoder = load_encoder(path, options)
    meta = dict(getattr(encoder, "selfsup_meta"))
    x = example_input(meta, TRACE_BATCH, seed=0)
    with torch.no_grad():
        artifact = writer(encoder, meta, x)
        check = example_input(meta, CHECK_BATCH, seed=1)
        want, got = encoder(check), artifact.features(check)
    diff = float((got.float() - want.float()).abs().max())
    if tuple(got.shape) != tuple(want.shape) or not diff <= TOLERANCE * max(1.0, float(want.abs().max())):
        raise ValueError(f"--format {fmt}: the exported model's features differ from the encoder's (max |diff| "
                         f"{diff:.3g}, shapes {tuple(got.shape)} vs {tuple(want.shape)}); nothing was written")
    config = {**artifact.config, "selfsup": describe(encoder, meta, fmt, sorted(artifact.files), x, diff)}
    urls = [storage.join(out, name) for name in sorted(artifact.files)]
    storage.makedirs(out, options)
    for name, url in zip(sorted(artifact.files), urls):
        storage.write_bytes(url, artifact.files[name], options)
    storage.write_text(storage.join(out, CONFIG), json.dumps(config, indent=1), options)  # last: complete
    return Exported([*urls, storage.join(out, CONFIG)], diff, config)


def describe(encoder: nn.Module, meta: Mapping[str, Any], fmt: str, files: list[str], x: torch.Tensor,
             diff: float) -> dict[str, Any]:
    """config.json's `selfsup` section: enough to feed the model without selfsup."""
    mean, std = meta.get("mean"), meta.get("std")
    if mean is None:  # a checkpoint from before meta.json recorded the normalization: the sample path's default
        mean, std = applied_norm(eval_sample(str(meta.get("modality")), meta.get("modality_args") or {}), None, None)
    scaled = mean is not None
    return {"format": fmt, "files": files, "backbone": meta["backbone"],
            "backbone_args": dict(meta.get("backbone_args") or {}), "out_dim": int(getattr(encoder, "out_dim")),
            "modality": meta.get("modality"), "modality_args": dict(meta.get("modality_args") or {}),
            "input": {"shape": ["B", *x.shape[1:]], "dtype": "float32",
                      "layout": "channels first" if scaled else "as the pipeline gives it (log-mel / waveform)",
                      "scale": 1 / 255 if scaled else None, "mean": mean, "std": std,
                      "formula": "(uint8 / 255 - mean) / std per channel" if scaled else "none"},
            "checkpoint": storage.redact_url(str(meta.get("checkpoint"))), "step": meta.get("step"),
            "check": {"max_abs_diff": diff, "batch": CHECK_BATCH, "tolerance": TOLERANCE}}


def safetensors_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    """A state dict as safetensors bytes (tensors made contiguous and unshared)."""
    from safetensors.torch import save

    return save({k: v.detach().contiguous().clone() for k, v in state.items()})


def load_safetensors(data: bytes) -> dict[str, torch.Tensor]:
    """safetensors bytes → state dict."""
    from safetensors.torch import load

    return load(data)


@FORMATS.register("safetensors")
def safetensors_format(encoder: nn.Module, meta: Mapping[str, Any], x: torch.Tensor) -> Artifact:
    """model.safetensors under selfsup's names; checked by rebuilding the backbone from the spec."""
    data = safetensors_bytes(encoder.state_dict())

    def features(y: torch.Tensor) -> torch.Tensor:
        model = backbone_from_spec(meta)
        model.load_state_dict(load_safetensors(data), strict=True)
        return model.eval()(y)

    return Artifact({"model.safetensors": data}, {}, features)


@FORMATS.register("timm")
def timm_format(encoder: nn.Module, meta: Mapping[str, Any], x: torch.Tensor) -> Artifact:
    """model.safetensors under timm's names + timm's hub config (local-dir: loads it); checked in timm."""
    import timm
    from timm.models import get_pretrained_cfg_value

    layout = timm_layout(encoder, str(meta["backbone"]), meta.get("backbone_args") or {},
                         str(meta.get("modality", "image")))
    data = safetensors_bytes(layout.state_dict)

    def features(y: torch.Tensor) -> torch.Tensor:
        net = timm.create_model(layout.architecture, pretrained=False, num_classes=0, **layout.model_args)
        net.load_state_dict(load_safetensors(data), strict=True)
        return net.eval()(y)

    mean, std = meta.get("mean"), meta.get("std")
    hub = {"architecture": layout.architecture, "num_classes": 0, "num_features": int(getattr(encoder, "out_dim")),
           "model_args": layout.model_args,
           "pretrained_cfg": {"input_size": list(x.shape[1:]), "mean": mean, "std": std, "num_classes": 0,
                              "fixed_input_size": bool(get_pretrained_cfg_value(layout.architecture,
                                                                                "fixed_input_size")),
                              "crop_pct": 1.0,
                              "interpolation": "bilinear"}}
    return Artifact({"model.safetensors": data}, hub, features)


@contextlib.contextmanager
def exporter_errors(fmt: str, meta: Mapping[str, Any]) -> Iterator[None]:
    """A tracer's or exporter's failure as a ValueError naming the format and the backbone."""
    try:
        yield
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - tracers and exporters raise many types
        raise ValueError(f"--format {fmt} cannot export backbone {meta.get('backbone')!r} ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}); try another "
                         f"format: {', '.join(FORMATS.names())}") from None


@contextlib.contextmanager
def jit_quiet() -> Iterator[None]:
    """Warnings off for TorchScript calls: shape checks traced as constants (intended), and torch's
    notice that TorchScript is deprecated (the format is asked for by name)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


@FORMATS.register("torchscript")
def torchscript_format(encoder: nn.Module, meta: Mapping[str, Any], x: torch.Tensor) -> Artifact:
    """model.torchscript.pt: the encoder traced on a batch of the eval input; checked by torch.jit.load."""
    with jit_quiet(), exporter_errors("torchscript", meta):
        traced = torch.jit.trace(encoder, x, check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    data = buf.getvalue()

    def features(y: torch.Tensor) -> torch.Tensor:
        with jit_quiet():
            return torch.jit.load(io.BytesIO(data), map_location="cpu")(y)

    return Artifact({"model.torchscript.pt": data}, {}, features)


def require(*modules: str) -> None:
    """Refuse, naming the extra to install, when a module the format needs is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"--format onnx needs {', '.join(missing)} (not installed): {EXPORT_EXTRA}")


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The ONNX exporter's progress (prints, warnings, INFO logs of its passes) kept off the console."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            for lg in loggers:
                lg.setLevel(logging.WARNING)
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


@FORMATS.register("onnx")
def onnx_format(encoder: nn.Module, meta: Mapping[str, Any], x: torch.Tensor) -> Artifact:
    """model.onnx from torch's dynamo exporter (batch axis dynamic); checked with onnxruntime."""
    require("onnx", "onnxscript", "onnxruntime")
    import onnxruntime

    with tempfile.TemporaryDirectory(prefix="selfsup-onnx-") as tmp, quiet_exporter(), \
            exporter_errors("onnx", meta):
        program = torch.onnx.export(encoder, (x,), dynamo=True, input_names=["input"], output_names=["features"],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
        if program is None:
            raise ValueError("torch.onnx.export returned no program; --format onnx needs torch's dynamo exporter")
        path = os.path.join(tmp, "model.onnx")
        program.save(path)
        with open(path, "rb") as f:
            data = f.read()

    def features(y: torch.Tensor) -> torch.Tensor:
        session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: y.numpy()})[0])

    return Artifact({"model.onnx": data}, {}, features)


__all__ = ["FORMATS", "Exported", "export_checkpoint"]
