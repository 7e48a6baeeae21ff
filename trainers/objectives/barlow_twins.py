"""Barlow Twins (Zbontar et al. 2021): the views' cross-correlation matrix pushed toward identity."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from selfsup.trainers.backbones import make_backbone
from selfsup.trainers.objectives import OBJECTIVES
from selfsup.trainers.objectives.base import LossOutput, split_decay
from selfsup.trainers.objectives.heads import batch_fields, feature_dim, mlp_head, world_size


def global_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over all ranks (differentiable), `x` itself on one process."""
    if world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x)


def batch_standardize(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-dimension (z - mean) / std over the global batch (BatchNorm without affine) [B, D]."""
    n = z.shape[0] * world_size()  # ranks hold equal batches (the epoch planner guarantees it)
    mean = global_sum(z.sum(dim=0)) / n  # [D]
    var = global_sum((z - mean).square().sum(dim=0)) / n  # [D], biased as in BatchNorm
    return (z - mean) / torch.sqrt(var + eps)


def cross_correlation(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Cross-correlation [D, D] of batch-standardized z1, z2 [B, D], over the global batch."""
    z1, z2 = batch_standardize(z1.float()), batch_standardize(z2.float())
    return global_sum(z1.T @ z2) / (z1.shape[0] * world_size())


def barlow_twins_loss(c: torch.Tensor, lambd: float) -> torch.Tensor:
    """Σ_i (1 - c_ii)² + λ Σ_{i≠j} c_ij² of a cross-correlation matrix c [D, D]."""
    diag = torch.diagonal(c)
    on_diag = (1 - diag).square().sum()
    off_diag = c.square().sum() - diag.square().sum()
    return on_diag + lambd * off_diag


@OBJECTIVES.register("barlow_twins")
class BarlowTwinsObjective(nn.Module):
    """Backbone + 3-layer projector; the loss decorrelates embedding dimensions across views."""

    needs: tuple[str, ...] = ("view1", "view2")

    def __init__(
        self,
        modality: str,
        backbone: str,
        backbone_args: dict[str, Any],
        lambd: float = 0.0051,
        proj_dim: int = 8192,
        proj_hidden: int = 8192,
        proj_layers: int = 3,
    ) -> None:
        super().__init__()
        if lambd < 0:
            raise ValueError(f"barlow_twins lambd={lambd}; it must be >= 0 (the paper uses 0.0051)")
        self.modality = modality
        self.lambd = float(lambd)
        self.backbone_name, self.backbone_args = backbone, dict(backbone_args)
        self.backbone = make_backbone(backbone, **backbone_args)
        # No bias on the last Linear: the standardization after it would cancel it.
        dim = feature_dim(self.backbone, backbone)
        self.projector = mlp_head(dim, proj_hidden, proj_dim, proj_layers, last_bias=False)

    def forward(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        """Barlow Twins loss of the two views' projections."""
        v1, v2 = batch_fields(batch, self.needs, "barlow_twins")
        b = v1.shape[0]
        h = self.backbone(torch.cat([v1, v2]))  # [2B, D]
        z = self.projector(h)  # [2B, P]
        loss = barlow_twins_loss(cross_correlation(z[:b], z[b:]), self.lambd)
        return LossOutput(loss=loss, embedding=h[:b].detach())

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Decay on weights only."""
        return split_decay(list(self.named_parameters()), weight_decay)

    def after_step(self, step: int, total_steps: int) -> None:
        """Nothing to update between steps."""

    def encoder(self) -> nn.Module:
        """The backbone evaluation loads."""
        return self.backbone

    def encoder_spec(self) -> dict[str, Any]:
        """How to rebuild `encoder()` with make_backbone."""
        return {"backbone": self.backbone_name, "backbone_args": dict(self.backbone_args)}

    def mask_spec(self) -> Optional[dict[str, Any]]:
        """Barlow Twins uses no masks."""
        return None
