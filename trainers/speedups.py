"""GPU options of the loop (train.* in the config): each a small function taking plain values.

Those that change numerics are off by default: channels_last (NHWC weights and inputs, for
ResNets on tensor cores), compile (torch.compile of the objective), cudnn_benchmark (cuDNN picks
its fastest algorithms, not deterministically), fused_adamw (trainers/optim.py) and DDP's
gradient_as_bucket_view and static_graph.
"""
from __future__ import annotations

import logging
from typing import Any, cast

import torch
from torch import nn

log = logging.getLogger(__name__)


def set_cudnn_benchmark(device: torch.device, on: bool) -> None:
    """cudnn.benchmark on CUDA devices (a process-wide switch; nothing elsewhere)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = on


def to_channels_last(model: nn.Module, on: bool) -> nn.Module:
    """The model's 4-d weights in NHWC order (a no-op for models without convolutions)."""
    return model.to(memory_format=torch.channels_last) if on else model


def ddp_options(bucket_view: bool, static_graph: bool) -> dict[str, Any]:
    """DistributedDataParallel keyword arguments for the chosen options (empty when none is on)."""
    out: dict[str, Any] = {}
    if bucket_view:
        out["gradient_as_bucket_view"] = True
    if static_graph:
        out["static_graph"] = True
    return out


def compile_model(model: nn.Module, on: bool, backend: str) -> nn.Module:
    """torch.compile of the (DDP-wrapped) objective; the loop times its first step apart (compile_s)."""
    if not on:
        return model
    return cast(nn.Module, torch.compile(model, backend=backend))
