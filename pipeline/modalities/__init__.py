"""Modalities, registered by name. Importing this package registers every one of them."""
from __future__ import annotations

from typing import Any, Callable

from selfsup.pipeline.modalities.base import DecodeError, Modality, Sample
from selfsup.pipeline.registry import Registry

MODALITIES: Registry[Callable[..., Modality]] = Registry("modality")


def make_modality(name: str, **args: Any) -> Modality:
    """Build the modality registered as `name` from its keyword arguments."""
    return MODALITIES.get(name)(**args)


__all__ = ["MODALITIES", "DecodeError", "Modality", "Sample", "make_modality"]

from selfsup.pipeline.modalities import image  # noqa: E402,F401  (registers "image")
from selfsup.pipeline.modalities import audio  # noqa: E402,F401  (registers "audio")
from selfsup.pipeline.modalities import video  # noqa: E402,F401  (registers "video")
