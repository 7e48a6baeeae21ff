"""`load_encoder(path)`: the one call a user needs to use a checkpoint elsewhere."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from selfsup.pipeline import storage
from selfsup.trainers import checkpoint as ck
from selfsup.trainers.backbones import backbone_from_spec


def load_encoder(path: str, options: Optional[Mapping[str, Any]] = None,
                 device: Any = "cpu") -> nn.Module:
    """Rebuild the encoder of a checkpoint (or a run's latest) from meta.json and encoder.pt.

    Args:
        path: a checkpoint folder (`<run>/checkpoints/step-N`) or a run folder, on any storage URL.
        options: storage options (endpoint_url, ...); credentials come from the environment.
    Returns:
        the backbone in eval mode, weights loaded with weights_only=True; its checkpoint's
        meta.json is attached as `encoder.selfsup_meta` (modality, normalization, step).
    Raises:
        ValueError naming meta.json and the field when its architecture is unknown or over the bounds of
        `check_backbone` (checked before any weight is allocated or read).
    """
    ckpt = ck.resolve_checkpoint(path, options)
    meta = ck.read_meta(ckpt, options)
    encoder = backbone_from_spec(meta, where=storage.redact_url(storage.join(ckpt, ck.META)))  # checked, then built
    weights = ck.load_torch(storage.join(ckpt, ck.ENCODER), options, map_location="cpu")
    encoder.load_state_dict(weights)
    encoder.selfsup_meta = {**meta, "checkpoint": ckpt}  # type: ignore[assignment]
    return encoder.to(torch.device(device) if isinstance(device, str) else device).eval()
