"""CorInfoMax (Ozsoy et al., NeurIPS 2022): correlative information maximization between the views.

Follows the authors' code, github:serdarozsoy/corinfomax-ssl at c0b917e,
imagenet100_resnet18/pretrain/loss.py (`CovarianceLossv2`, the loss their ImageNet-100 scripts
import) with model_base_wmse_resnet18.py and pretrain_base_dist_multigpulinear.py:

    z1, z2 = L2-normalized projections of the views                                   [B, D]
    μ_k ← la_mu·μ_k + (1 - la_mu)·mean(z_k)                                           [D]
    R_k ← la_R·R_k + (1 - la_R)·(z_k - μ_k)ᵀ(z_k - μ_k) / N   (μ_k the updated mean)   [D, D]
    loss = sim_weight·MSE(z1, z2) - cov_weight·(logdet(R_1 + εI) + logdet(R_2 + εI)) / D

R_k and μ_k start at r_init·I and 0, live in float64 (as theirs) and are registered buffers, so a
checkpoint keeps them. The loss differentiates through this step's update (the stored estimates
are detached), and the estimates are stored after each training forward, as the authors do.
Where the authors gather z from every rank, the batch statistics here are all-reduced sums
(`global_sum`), so every rank holds the same μ_k and R_k and the loss of the global batch.
Argument names map to the authors' flags: la_r = la_R, r_init = R_ini, r_eps = R_eps_weight,
sim_weight = sim_loss_weight, cov_weight = cov_loss_weight, normalize = normalize_on.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.trainers.backbones import make_backbone
from selfsup.trainers.objectives import OBJECTIVES
from selfsup.trainers.objectives.base import LossOutput, split_decay
from selfsup.trainers.objectives.heads import batch_fields, feature_dim, global_sum, mlp_head, world_size


def running_moments(z: torch.Tensor, mu: torch.Tensor, r: torch.Tensor, la_mu: float,
                    la_r: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The updated running mean [D] and covariance [D, D] (float64) after a batch z [B, D].

    μ' = la_mu·μ + (1 - la_mu)·mean(z);  R' = la_r·R + (1 - la_r)·(z - μ')ᵀ(z - μ')/N over the global batch.
    """
    z = z.double()
    n = z.shape[0] * world_size()  # ranks hold equal batches
    mu_new = la_mu * mu + (1 - la_mu) * (global_sum(z.sum(dim=0)) / n)  # [D]
    zc = z - mu_new  # [B, D]
    r_new = la_r * r + (1 - la_r) * (global_sum(zc.T @ zc) / n)  # [D, D]
    return mu_new, r_new


def logdet_loss(r: torch.Tensor, eps: float) -> torch.Tensor:
    """-logdet(R + εI) / D of a covariance estimate R [D, D]."""
    d = r.shape[0]
    return -torch.logdet(r + eps * torch.eye(d, dtype=r.dtype, device=r.device)) / d


def invariance_loss(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of z1, z2 [B, D] over the global batch (F.mse_loss of the gathered rows)."""
    n = z1.shape[0] * world_size()
    return global_sum((z1 - z2).square().sum()) / (n * z1.shape[1])


@OBJECTIVES.register("corinfomax")
class CorInfoMaxObjective(nn.Module):
    """Backbone + projector; alignment of the views plus the log-determinant of each branch's running covariance."""

    needs: tuple[str, ...] = ("view1", "view2")
    r1: torch.Tensor  # [P, P] float64 running covariance of view 1's embeddings (a buffer)
    r2: torch.Tensor  # [P, P] the same for view 2
    mu1: torch.Tensor  # [P] float64 running mean of view 1's embeddings (a buffer)
    mu2: torch.Tensor  # [P] the same for view 2

    def __init__(
        self,
        modality: str,
        backbone: str,
        backbone_args: dict[str, Any],
        sim_weight: float = 500.0,
        cov_weight: float = 1.0,
        la_r: float = 0.01,
        la_mu: float = 0.01,
        r_init: float = 1.0,
        r_eps: float = 1e-8,
        normalize: bool = True,
        proj_dim: int = 128,
        proj_hidden: int = 4096,
        proj_layers: int = 3,
    ) -> None:
        super().__init__()
        check_args(sim_weight=sim_weight, cov_weight=cov_weight, la_r=la_r, la_mu=la_mu, r_init=r_init, r_eps=r_eps)
        self.modality = modality
        self.sim_weight, self.cov_weight = float(sim_weight), float(cov_weight)
        self.la_r, self.la_mu, self.r_eps, self.normalize = float(la_r), float(la_mu), float(r_eps), bool(normalize)
        self.backbone_name, self.backbone_args = backbone, dict(backbone_args)
        self.backbone = make_backbone(backbone, **backbone_args)
        self.projector = mlp_head(feature_dim(self.backbone, backbone), proj_hidden, proj_dim, proj_layers,
                                  last_bias=False)
        for k in (1, 2):
            self.register_buffer(f"r{k}", float(r_init) * torch.eye(proj_dim, dtype=torch.float64))
            self.register_buffer(f"mu{k}", torch.zeros(proj_dim, dtype=torch.float64))

    def forward(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        """CorInfoMax loss of the two views; in training mode the running estimates advance."""
        v1, v2 = batch_fields(batch, self.needs, "corinfomax")
        b = v1.shape[0]
        h = self.backbone(torch.cat([v1, v2]))  # [2B, D]
        z = self.projector(h).float()  # [2B, P]
        if self.normalize:
            z = F.normalize(z, p=2, dim=1)
        with torch.autocast(z.device.type, enabled=False):  # statistics and logdet in float64
            mu1, r1 = running_moments(z[:b], self.mu1, self.r1, self.la_mu, self.la_r)
            mu2, r2 = running_moments(z[b:], self.mu2, self.r2, self.la_mu, self.la_r)
            cov = logdet_loss(r1, self.r_eps) + logdet_loss(r2, self.r_eps)
            sim = invariance_loss(z[:b], z[b:])
        if self.training:
            with torch.no_grad():
                for name, value in (("mu1", mu1), ("r1", r1), ("mu2", mu2), ("r2", r2)):
                    getattr(self, name).copy_(value)
        loss = self.sim_weight * sim + self.cov_weight * cov.float()
        return LossOutput(loss=loss, embedding=h[:b].detach())

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Decay on weights only."""
        return split_decay(list(self.named_parameters()), weight_decay)

    def after_step(self, step: int, total_steps: int) -> None:
        """Nothing: the running estimates advance in the forward, as in the authors' code."""

    def encoder(self) -> nn.Module:
        """The backbone evaluation loads."""
        return self.backbone

    def encoder_spec(self) -> dict[str, Any]:
        """How to rebuild `encoder()` with make_backbone."""
        return {"backbone": self.backbone_name, "backbone_args": dict(self.backbone_args)}

    def mask_spec(self) -> Optional[dict[str, Any]]:
        """CorInfoMax uses no masks."""
        return None


def check_args(sim_weight: float, cov_weight: float, la_r: float, la_mu: float, r_init: float, r_eps: float) -> None:
    """ValueError naming the first out-of-range CorInfoMax argument and its valid range."""
    for name, value in (("sim_weight", sim_weight), ("cov_weight", cov_weight), ("r_eps", r_eps)):
        if value < 0:
            raise ValueError(f"corinfomax {name}={value}; it must be >= 0 (the authors use sim_weight 250-2000, "
                             "cov_weight 1, r_eps 1e-8)")
    for name, value in (("la_r", la_r), ("la_mu", la_mu)):
        if not 0 <= value < 1:
            raise ValueError(f"corinfomax {name}={value}; it is the weight of the old estimate and must lie in "
                             "[0, 1) (the authors use 0.01 or 0.1)")
    if r_init <= 0:
        raise ValueError(f"corinfomax r_init={r_init}; the covariance starts at r_init·I and needs r_init > 0 "
                         "(the authors use 1.0)")
