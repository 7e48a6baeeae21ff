"""Checkpoints: `<run>/checkpoints/step-NNNNNN/` holding state.pt, encoder.pt and meta.json.

meta.json is written last, after the other files are fully in storage: a checkpoint folder
without it is incomplete and ignored. Everything is loaded with `weights_only=True`.
Retention keeps the last K complete checkpoints and the promoted one; with `keep_unevaluated` (off by
default) also any that evaluation has not marked yet (`evaluated.json` in the checkpoint folder).
"""
from __future__ import annotations

import importlib
import io
import json
import logging
import platform
import re
import sys
import time
from typing import Any, Mapping, Optional

import torch

from selfsup.pipeline import storage

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
META, STATE, ENCODER, EVALUATED = "meta.json", "state.pt", "encoder.pt", "evaluated.json"
PROMOTED = "promoted.json"
_STEP = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    """step-000500."""
    return f"step-{step:06d}"


def library_versions() -> dict[str, str]:
    """Versions that decide the bytes of batches and the numerics of the model."""
    import numpy

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
           "machine": platform.machine()}
    for name in ("torchvision", "torchaudio", "cv2", "ray", "av", "soundfile"):
        mod = sys.modules.get(name)
        if mod is None and name in ("av", "soundfile"):  # the modalities import them on first use
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
        if mod is not None:
            out[name] = str(getattr(mod, "__version__", "?"))
    return out


# Settings that decide which samples each data position holds: a resume under other values would
# skip or repeat samples (the position counts micro-batches of the old plan).
PLAN_SETTINGS = ("data.batch_size", "data.mix", "data.run_length", "train.seed", "data.sources")


def plan_changes(meta: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
    """'setting: old → new' for each PLAN_SETTINGS value that differs between a checkpoint's
    meta.json (its recorded config) and `config` (a config as plain data, secrets stripped)."""
    old_config = meta.get("config")
    if not isinstance(old_config, Mapping):
        return []  # a checkpoint from before configs were recorded: nothing to compare
    out = []
    for name in PLAN_SETTINGS:
        old, new = _dotted(old_config, name), _dotted(config, name)
        if old != new:
            out.append(f"{name}: {_short(old)} → {_short(new)}")
    return out


def _dotted(data: Mapping[str, Any], name: str) -> Any:
    value: Any = data
    for part in name.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 160 else text[:157] + "..."


def torch_bytes(obj: Any) -> bytes:
    """torch.save into memory."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load_torch(url: str, options: Optional[Mapping[str, Any]] = None, map_location: Any = "cpu") -> Any:
    """torch.load(weights_only=True) of a file at any storage URL."""
    data = storage.read_bytes(url, options=options)
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for damaged files
        raise ValueError(f"{storage.redact_url(url)} is not a readable checkpoint file ({type(e).__name__}: "
                         f"{str(e)[:200]}); the checkpoint is corrupt — use another step") from None


def list_checkpoints(run: str, options: Optional[Mapping[str, Any]] = None,
                     complete_only: bool = True) -> list[tuple[int, str]]:
    """(step, URL) of the run's checkpoints, ascending; only complete ones by default."""
    root = storage.join(run, CHECKPOINTS)
    if not storage.exists(root, options):
        return []
    out = []
    for url in storage.listdir(root, options):
        m = _STEP.match(url.rstrip("/").rsplit("/", 1)[-1])
        if m and (not complete_only or storage.exists(storage.join(url, META), options)):
            out.append((int(m.group(1)), url.rstrip("/")))
    return sorted(out)


def latest_checkpoint(run: str, options: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """The URL of the newest complete checkpoint, or None."""
    found = list_checkpoints(run, options)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str, options: Optional[Mapping[str, Any]] = None) -> str:
    """A checkpoint folder URL from a checkpoint folder or a run folder (its latest checkpoint)."""
    if storage.exists(storage.join(path, META), options):
        return path.rstrip("/")
    latest = latest_checkpoint(path, options)
    if latest is None:
        raise FileNotFoundError(f"{storage.redact_url(path)} is neither a complete checkpoint (no {META}) "
                                "nor a run folder with one; train first, or pass checkpoints/step-N")
    return latest


def read_meta(ckpt: str, options: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """A checkpoint's meta.json."""
    url = storage.join(ckpt, META)
    try:
        meta = json.loads(storage.read_text(url, options))
    except FileNotFoundError:
        raise FileNotFoundError(f"{storage.redact_url(ckpt)} has no {META}: the checkpoint is incomplete") from None
    except ValueError as e:
        raise ValueError(f"{storage.redact_url(url)} is not valid JSON ({e}); the checkpoint is corrupt") from None
    if not isinstance(meta, dict) or "backbone" not in meta or "step" not in meta:
        raise ValueError(f"{storage.redact_url(url)} lacks backbone/step; the checkpoint is corrupt")
    return meta


def write_meta(ckpt: str, meta: Mapping[str, Any], options: Optional[Mapping[str, Any]] = None) -> None:
    """Write meta.json (the last file; it makes the checkpoint complete)."""
    storage.write_text(storage.join(ckpt, META), json.dumps({**meta, "written": time.time()}, indent=1), options)


def promoted_step(run: str, options: Optional[Mapping[str, Any]] = None) -> Optional[int]:
    """The step the run has promoted, if any."""
    url = storage.join(run, PROMOTED)
    if not storage.exists(url, options):
        return None
    return int(json.loads(storage.read_text(url, options))["step"])


def is_evaluated(ckpt: str, options: Optional[Mapping[str, Any]] = None) -> bool:
    """Whether evaluation has marked the checkpoint."""
    return storage.exists(storage.join(ckpt, EVALUATED), options)


def prune(run: str, keep: int, keep_unevaluated: bool, options: Optional[Mapping[str, Any]] = None) -> list[str]:
    """Delete checkpoints outside the retention rule; returns the deleted URLs.

    Kept: the last `keep` complete ones, the promoted one, the newest, and with `keep_unevaluated` every
    complete one evaluation has not marked. Nothing marks checkpoints without an evaluator, so that
    keeps them all: a warning says so while no checkpoint of the run has been evaluated.
    """
    complete = list_checkpoints(run, options)
    if not complete:
        return []
    newest = complete[-1][0]
    kept = {s for s, _ in complete[-keep:]}
    promoted = promoted_step(run, options)
    deleted, held = [], []
    for step, url in list_checkpoints(run, options, complete_only=False):
        if step in kept or step == promoted or step >= newest:
            continue
        if step in dict(complete) and keep_unevaluated and not is_evaluated(url, options):
            held.append(url)
            continue
        storage.delete(url, recursive=True, options=options)
        deleted.append(url)
    if held and not any(is_evaluated(url, options) for step, url in complete if step in kept):
        log.warning("retention: %d older checkpoint(s) kept only because no evaluation has marked them "
                    "(train.keep_unevaluated=true); without `selfsup evaluate RUN --watch` every checkpoint "
                    "stays: set train.keep_unevaluated=false to keep the last %d", len(held), keep)
    return deleted


def check_versions(meta: Mapping[str, Any]) -> list[str]:
    """Libraries whose version differs from the checkpoint's (batches or numerics may differ)."""
    saved = meta.get("versions", {})
    now = library_versions()
    return [f"{k} {saved[k]} → {now[k]}" for k in sorted(saved) if k in now and saved[k] != now[k]]
