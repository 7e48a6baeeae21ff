"""Backbones (encoders), registered by name. Importing this package registers every one of them.

Every backbone is an nn.Module with an integer attribute `out_dim` whose forward maps the
modality's normalized input to features [B, out_dim] (see trainers/objectives/base.py for the
input shapes). Token-based encoders (ViTs) also expose the pieces MAE needs.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from selfsup.pipeline.registry import Registry

BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone")


def make_backbone(name: str, **args: Any) -> nn.Module:
    """Build the backbone registered as `name` from its keyword arguments."""
    return BACKBONES.get(name)(**args)


def backbone_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a backbone from an objective's `encoder_spec()` ({"backbone", "backbone_args"})."""
    return make_backbone(spec["backbone"], **dict(spec.get("backbone_args") or {}))


from selfsup.trainers.backbones import cnn, resnet, vit, audio, video, wav2vec2  # noqa: E402,F401

__all__ = ["BACKBONES", "backbone_from_spec", "make_backbone"]
