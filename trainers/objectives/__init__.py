"""Objectives, registered by name. Importing this package registers every one of them."""
from __future__ import annotations

from typing import Any, Callable

from selfsup.pipeline.registry import Registry
from selfsup.trainers.objectives.base import LossOutput, Objective, as_module

OBJECTIVES: Registry[Callable[..., Objective]] = Registry("objective")


def make_objective(name: str, **args: Any) -> Objective:
    """Build the objective registered as `name` (an nn.Module) from plain arguments."""
    objective = OBJECTIVES.get(name)(**args)
    as_module(objective)  # a TypeError now rather than in the loop
    return objective


from selfsup.trainers.objectives import simclr, byol, barlow_twins, mae, wav2vec2  # noqa: E402,F401
from selfsup.trainers.objectives import corinfomax, exemplar, s4l, swav, temporal_order  # noqa: E402,F401

__all__ = ["OBJECTIVES", "LossOutput", "Objective", "make_objective"]
