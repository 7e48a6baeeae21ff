"""Barlow Twins (Zbontar et al. 2021): the views' cross-correlation matrix pushed toward identity.

With `mix_weight > 0` it is Mixed Barlow Twins (Bandara et al. 2023, "Guarding Barlow Twins Against
Overfitting with Mixed Samples"; github:wgcban/mix-bt, main.py at e2c6af0): a third batch
x_m = λ·view1 + (1 - λ)·view2[perm] (λ ~ Beta(1, 1), perm a shuffle of the rows) goes through the same
network, and the mixed embedding's cross-correlations with each view are pulled toward what linear
mixing predicts (`mixup_regularizer`), weighted by mix_weight·λ_BT as in the authors' main.py
(their ImageNet script adds a factor 0.5, warms the weight up over 10 epochs and uses Z_Bᵀ Z_B where
the paper's equation has Z_Aᵀ Z_B; this follows the equation). The draws come from `mixing.StepSeeds`.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from selfsup.trainers.backbones import make_backbone
from selfsup.trainers.objectives import OBJECTIVES
from selfsup.trainers.objectives.base import LossOutput, split_decay
from selfsup.trainers.objectives.heads import batch_fields, feature_dim, global_sum, mlp_head, world_size
from selfsup.trainers.objectives.mixing import StepSeeds, draw_mixup, mix_inputs


def batch_standardize(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-dimension (z - mean) / std over the global batch (BatchNorm without affine) [B, D]."""
    n = z.shape[0] * world_size()  # ranks hold equal batches (the epoch planner guarantees it)
    mean = global_sum(z.sum(dim=0)) / n  # [D]
    var = global_sum((z - mean).square().sum(dim=0)) / n  # [D], biased as in BatchNorm
    return (z - mean) / torch.sqrt(var + eps)


def correlate(s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """Σ_ranks s1ᵀ s2 / N [D, D] of already standardized s1, s2 [B, D] (N: the global batch)."""
    return global_sum(s1.T @ s2) / (s1.shape[0] * world_size())


def cross_correlation(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Cross-correlation [D, D] of batch-standardized z1, z2 [B, D], over the global batch."""
    return correlate(batch_standardize(z1.float()), batch_standardize(z2.float()))


def barlow_twins_loss(c: torch.Tensor, lambd: float) -> torch.Tensor:
    """Σ_i (1 - c_ii)² + λ Σ_{i≠j} c_ij² of a cross-correlation matrix c [D, D]."""
    diag = torch.diagonal(c)
    on_diag = (1 - diag).square().sum()
    off_diag = c.square().sum() - diag.square().sum()
    return on_diag + lambd * off_diag


def mixup_regularizer(sm: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, lam: float,
                      perm: torch.Tensor) -> torch.Tensor:
    """Mixed Barlow Twins' term over standardized embeddings s_m, s_1, s_2 [B, D], C(a, b) = aᵀb / N:

    ‖C(s_m, s_1) - λ·C(s_1, s_1) - (1-λ)·C(s_2[perm], s_1)‖² + ‖C(s_m, s_2) - λ·C(s_1, s_2) - (1-λ)·C(s_2[perm], s_2)‖²
    (squared Frobenius norms; perm permutes each rank's own rows, as the authors' DDP code does).
    """
    s2p = s2[perm.to(s2.device)]
    target1 = lam * correlate(s1, s1) + (1 - lam) * correlate(s2p, s1)
    target2 = lam * correlate(s1, s2) + (1 - lam) * correlate(s2p, s2)
    return (correlate(sm, s1) - target1).square().sum() + (correlate(sm, s2) - target2).square().sum()


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
        mix_weight: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if lambd < 0:
            raise ValueError(f"barlow_twins lambd={lambd}; it must be >= 0 (the paper uses 0.0051)")
        if mix_weight < 0:
            raise ValueError(f"barlow_twins mix_weight={mix_weight}; it must be >= 0 (0 = plain Barlow Twins, "
                             "Mixed Barlow Twins uses 1-4)")
        self.mix_weight = float(mix_weight)
        # Only Mixed Barlow Twins has mixing state, so plain runs keep their state_dict keys.
        self.mix_seeds = StepSeeds(seed) if self.mix_weight > 0 else None
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
        if self.mix_seeds is None:
            loss = barlow_twins_loss(cross_correlation(z[:b], z[b:]), self.lambd)
            return LossOutput(loss=loss, embedding=h[:b].detach())
        s1, s2 = batch_standardize(z[:b].float()), batch_standardize(z[b:].float())
        lam, perm = draw_mixup(self.mix_seeds.generator("mixed_barlow_twins"), b)
        # A forward of its own, as the authors': the mixed batch's BatchNorm statistics stay apart.
        sm = batch_standardize(self.projector(self.backbone(mix_inputs(v1, v2, lam, perm))).float())
        reg = mixup_regularizer(sm, s1, s2, lam, perm)
        loss = barlow_twins_loss(correlate(s1, s2), self.lambd) + self.mix_weight * self.lambd * reg
        return LossOutput(loss=loss, metrics={"mix_lambda": lam}, embedding=h[:b].detach())

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Decay on weights only."""
        return split_decay(list(self.named_parameters()), weight_decay)

    def after_step(self, step: int, total_steps: int) -> None:
        """Mixed Barlow Twins: the next step's draws; plain Barlow Twins: nothing."""
        if self.mix_seeds is not None:
            self.mix_seeds.after_step(step)

    def encoder(self) -> nn.Module:
        """The backbone evaluation loads."""
        return self.backbone

    def encoder_spec(self) -> dict[str, Any]:
        """How to rebuild `encoder()` with make_backbone."""
        return {"backbone": self.backbone_name, "backbone_args": dict(self.backbone_args)}

    def mask_spec(self) -> Optional[dict[str, Any]]:
        """Barlow Twins uses no masks."""
        return None
