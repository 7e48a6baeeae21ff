"""Temporal order (VCOP, Xu et al. CVPR 2019): classify which permutation shuffled a tuple of sub-clips.

The video modality's `output: order` gives `clips` [B, n, C, t, H, W] (n sub-clips, shuffled) and
`order` [B] (the permutation's index among the n! of pipeline/modalities/clip_order.py). As in
VCOP's network: a shared 3-D backbone encodes every sub-clip, f_i = backbone(clip_i); each pair
i < j is concatenated and mapped by one shared layer g(f_i, f_j) = ReLU(W_p [f_i; f_j] + b_p);
the n(n-1)/2 pair vectors are concatenated (in the order (0,1), (0,2), ..., (n-2,n-1)), dropped
out and mapped to n! logits; the loss is the cross-entropy with `order`. Telling an order from
its reverse needs the direction of motion inside a sub-clip, which makes the features motion-sensitive.
"""
from __future__ import annotations

import itertools
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.pipeline.modalities.clip_order import MAX_ORDER_CLIPS, permutations
from selfsup.trainers.backbones import make_backbone
from selfsup.trainers.objectives import OBJECTIVES
from selfsup.trainers.objectives.base import LossOutput, split_decay
from selfsup.trainers.objectives.heads import batch_fields, feature_dim


def pair_features(f: torch.Tensor) -> torch.Tensor:
    """[B, n, D] clip features → [B, n(n-1)/2, 2D]: [f_i; f_j] for every pair i < j, in lexicographic order."""
    i, j = zip(*itertools.combinations(range(f.shape[1]), 2))
    return torch.cat([f[:, list(i)], f[:, list(j)]], dim=-1)


class OrderHead(nn.Module):
    """VCOP's head: a shared pair layer (Linear + ReLU) on each [f_i; f_j], then Linear to n! logits."""

    def __init__(self, feature_dim: int, clips: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.pair = nn.Linear(2 * feature_dim, hidden)
        self.dropout = nn.Dropout(dropout)
        self.classify = nn.Linear(hidden * (clips * (clips - 1) // 2), len(permutations(clips)))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """Clip features [B, n, D] → permutation logits [B, n!]."""
        h = F.relu(self.pair(pair_features(f)))  # [B, P, hidden]
        return self.classify(self.dropout(h.flatten(1)))  # [B, n!]


def order_accuracy(logits: torch.Tensor, order: torch.Tensor) -> float:
    """Fraction of rows whose arg-max permutation is the true one (6 classes: chance is 1/6)."""
    return float((logits.argmax(dim=1) == order).float().mean())


@OBJECTIVES.register("temporal_order")
class TemporalOrderObjective(nn.Module):
    """Video backbone (shared over sub-clips) + VCOP order head, cross-entropy over the n! orders."""

    needs: tuple[str, ...] = ("clips", "order")

    def __init__(
        self,
        modality: str,
        backbone: str,
        backbone_args: dict[str, Any],
        clips: int = 3,
        hidden: int = 512,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if modality != "video":
            raise ValueError(f"temporal_order orders video sub-clips but data.modality={modality!r}; "
                             "use data.modality: video with modality_args.output: order")
        if not 2 <= clips <= MAX_ORDER_CLIPS:
            raise ValueError(f"temporal_order clips={clips}; use 2..{MAX_ORDER_CLIPS}, equal to "
                             "data.modality_args.order_clips (VCOP uses 3)")
        if hidden < 1 or not 0 <= dropout < 1:
            raise ValueError(f"temporal_order hidden={hidden}, dropout={dropout}; need hidden >= 1 and "
                             "0 <= dropout < 1 (VCOP: 512, 0.5)")
        self.modality, self.clips = modality, int(clips)
        self.backbone_name, self.backbone_args = backbone, dict(backbone_args)
        self.backbone = make_backbone(backbone, **backbone_args)
        self.head = OrderHead(feature_dim(self.backbone, backbone), self.clips, hidden, dropout)

    def forward(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        """Cross-entropy of the permutation logits against `order`."""
        clips, order = batch_fields(batch, self.needs, "temporal_order")
        if clips.ndim != 6 or clips.shape[1] != self.clips:
            raise ValueError(
                f"temporal_order expects clips [B, {self.clips}, C, t, H, W], got {tuple(clips.shape)}; "
                "set data.modality_args.output: order and order_clips equal to objective.args.clips")
        b, n = clips.shape[:2]
        f = self.backbone(clips.flatten(0, 1)).view(b, n, -1)  # [B, n, D]; one pass, BatchNorm sees all
        logits = self.head(f)  # [B, n!]
        loss = F.cross_entropy(logits.float(), order.long())
        return LossOutput(loss=loss, metrics={"order_acc": order_accuracy(logits.detach(), order)},
                          embedding=f[:, 0].detach())

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Decay on weights only."""
        return split_decay(list(self.named_parameters()), weight_decay)

    def after_step(self, step: int, total_steps: int) -> None:
        """Nothing to update between steps."""

    def encoder(self) -> nn.Module:
        """The video backbone, which evaluation loads (it takes clips of any length)."""
        return self.backbone

    def encoder_spec(self) -> dict[str, Any]:
        """How to rebuild `encoder()` with make_backbone."""
        return {"backbone": self.backbone_name, "backbone_args": dict(self.backbone_args)}

    def mask_spec(self) -> Optional[dict[str, Any]]:
        """Temporal order uses no masks."""
        return None
