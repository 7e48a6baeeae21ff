"""Objectives, registered by name. Importing this package registers every one of them."""
from __future__ import annotations

from typing import Any

from selfsup.pipeline.registry import Registry
from selfsup.trainers.objectives.base import LossOutput

OBJECTIVES: Registry[Any] = Registry("objective")


def make_objective(name: str, **args: Any) -> Any:
    """Build the objective registered as `name` (an nn.Module) from plain arguments."""
    return OBJECTIVES.get(name)(**args)


from selfsup.trainers.objectives import simclr, byol, barlow_twins, mae, wav2vec2  # noqa: E402,F401

__all__ = ["OBJECTIVES", "LossOutput", "make_objective"]
