"""The objective interface the training loop drives.

An objective is an `nn.Module` with the hooks of `Objective` below, built from plain arguments:

    OBJECTIVES.get(name)(modality=..., backbone=..., backbone_args={...}, **objective_args)

and the loop calls, in this order each step:

    out = objective(batch)            # LossOutput; batch holds tensors already on the device
    out.loss.backward(); optimizer.step()
    objective.after_step(step, total_steps)   # e.g. BYOL's EMA update, Gumbel temperature

Batch tensors the loop hands over (uint8 already converted to float and normalized):
- image:  view1, view2 or image  float [B, C, H, W];  mask bool [B, N] (True = hidden)
          local  float [B, K, C, S, S] with multi-crop (modality local_crops=K, local_size=S)
- video:  view1, view2 or video  float [B, C, T, H, W];  mask bool [B, N];
          clips float [B, n, C, t, H, W] and order long [B] (output: order, temporal_order)
- audio:  view1, view2 or spec   float [B, F, T] (log-mel);  wave float [B, S], length long [B];
          mask bool [B, N] over spectrogram patches or over conv-encoder frames;
          local float [B, K, F, T_local] with multi-crop
Masks hold exactly the same number of True per row, so masked tokens can be dropped by gather.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional, Protocol

import torch
from torch import nn


@dataclass
class LossOutput:
    """A step's loss, scalar metrics to log, and the embedding whose spread signals collapse."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    embedding: Optional[torch.Tensor] = None  # [B, D], detached; the loop logs its per-dim std


class Objective(Protocol):
    """What the training loop needs from an objective: an nn.Module subclass with these hooks.

    The loop moves the module to its device, wraps it in DDP, clips its parameters' gradients
    and saves its state_dict; those nn.Module members are restated at the end so that a type
    checker holds the loop to them too. Register a class with `@OBJECTIVES.register(name)`.
    """

    def forward(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        """The step's loss from a batch of device tensors (fields as in this module's docstring)."""

    def __call__(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        """nn.Module's call: hooks, then `forward`."""

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups (e.g. `split_decay`: no decay on biases, norms, tokens)."""

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after each optimizer step with the steps done and the schedule's end (EMA, temperatures)."""

    def encoder(self) -> nn.Module:
        """The network evaluation loads; its state_dict is the checkpoint's encoder.pt."""

    def encoder_spec(self) -> dict[str, Any]:
        """How to rebuild `encoder()`: {"backbone": name, "backbone_args": {...}} for make_backbone."""

    def mask_spec(self) -> Optional[dict[str, Any]]:
        """The masks the pipeline must draw ({"kind", "ratio", "geometry", ...}), or None for none."""

    # nn.Module members the loop relies on
    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any: ...


def as_module(objective: Objective) -> nn.Module:
    """The objective as the nn.Module it must be (what the loop moves, wraps in DDP and saves)."""
    if not isinstance(objective, nn.Module):
        raise TypeError(f"objective {type(objective).__name__} is not an nn.Module; "
                        "registered objectives must subclass torch.nn.Module")
    return objective


def split_decay(named_params: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW/LARS groups: decay on weights, none on biases, norms, tokens and embeddings."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embed" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
    ]
