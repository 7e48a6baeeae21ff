"""Objectives, backbones, the Ray Train loop and checkpoints. `load_encoder` reuses a checkpoint."""
from __future__ import annotations

from typing import Any


def load_encoder(path: str, options: Any = None, device: Any = "cpu") -> Any:
    """Rebuild a checkpoint's encoder (see trainers.encoder.load_encoder)."""
    from selfsup.trainers.encoder import load_encoder as _load

    return _load(path, options, device)


__all__ = ["load_encoder"]
