"""The objective interface the training loop drives.

An objective is an `nn.Module` built from plain arguments:

    OBJECTIVES.get(name)(modality=..., backbone=..., backbone_args={...}, **objective_args)

and the loop calls, in this order each step:

    out = objective(batch)            # LossOutput; batch holds tensors already on the device
    out.loss.backward(); optimizer.step()
    objective.after_step(step, total_steps)   # e.g. BYOL's EMA update, Gumbel temperature

Batch tensors the loop hands over (uint8 already converted to float and normalized):
- image:  view1, view2 or image  float [B, C, H, W];  mask bool [B, N] (True = hidden)
- video:  view1, view2 or video  float [B, C, T, H, W];  mask bool [B, N]
- audio:  view1, view2 or spec   float [B, F, T] (log-mel);  wave float [B, S], length long [B];
          mask bool [B, N] over spectrogram patches or over conv-encoder frames
Masks hold exactly the same number of True per row, so masked tokens can be dropped by gather.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn


@dataclass
class LossOutput:
    """A step's loss, scalar metrics to log, and the embedding whose spread signals collapse."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    embedding: Optional[torch.Tensor] = None  # [B, D], detached; the loop logs its per-dim std


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
