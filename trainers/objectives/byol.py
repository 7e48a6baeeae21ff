"""BYOL (Grill et al. 2020): online network predicts an EMA target's projection of the other view.

For audio it can run BYOL-A's batch-level steps (Niizumi et al. 2021, github:nttcslab/byol-a at
3e65c92, byol_a/augmentations.py and train.py), which need other clips of the batch and so happen
here, on the device, before the networks see the views: `mixup_ratio > 0` mixes each view with
another clip of the batch as background in the linear (exp of log-mel) domain, the background's
share α ~ U(0, mixup_ratio) per view (BYOL-A's MixupBYOLA, ratio 0.4; its background comes from a
FIFO memory of 2048 past clips, here from the same batch on the same rank), drawn from
`mixing.StepSeeds`; `post_norm` then standardizes both views by the global batch's mean and std
(BYOL-A's NormalizeBatch). Pre-normalization and the random resize crop stay per sample in the
audio modality, so the crop comes before the mixup here (BYOL-A: mixup, then crop).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.trainers.backbones import make_backbone
from selfsup.trainers.objectives import OBJECTIVES
from selfsup.trainers.objectives.base import LossOutput, split_decay
from selfsup.trainers.objectives.heads import batch_fields, feature_dim, mlp_head
from selfsup.trainers.objectives.mixing import StepSeeds, byola_views


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mean of 2 - 2·cos(p, z) over rows of predictions p and targets z [B, D]."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.float(), dim=-1)).mean()


def cosine_tau(tau_base: float, step: int, total_steps: int) -> float:
    """EMA rate rising from tau_base to 1: 1 - (1 - tau_base)·(cos(π·step/total) + 1)/2."""
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps}; it must be positive for BYOL's tau schedule")
    progress = min(max(step / total_steps, 0.0), 1.0)
    return 1 - (1 - tau_base) * (math.cos(math.pi * progress) + 1) / 2


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """target ← tau·target + (1 - tau)·online, parameter by parameter."""
    t_params: list[torch.Tensor] = list(target.parameters())
    o_params: list[torch.Tensor] = list(online.parameters())
    torch._foreach_lerp_(t_params, o_params, 1 - tau)


@OBJECTIVES.register("byol")
class BYOLObjective(nn.Module):
    """Online backbone+projector+predictor; EMA target backbone+projector (in the state_dict, no grads)."""

    needs: tuple[str, ...] = ("view1", "view2")

    def __init__(
        self,
        modality: str,
        backbone: str,
        backbone_args: dict[str, Any],
        tau_base: float = 0.996,
        proj_dim: int = 256,
        proj_hidden: int = 4096,
        pred_hidden: Optional[int] = None,
        mixup_ratio: float = 0.0,
        post_norm: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0 <= tau_base <= 1:
            raise ValueError(f"byol tau_base={tau_base}; it must lie in [0, 1] (BYOL uses 0.99–0.996)")
        if not 0 <= mixup_ratio <= 1:
            raise ValueError(f"byol mixup_ratio={mixup_ratio}; it must lie in [0, 1] (BYOL-A uses 0.4, 0 = off)")
        if (mixup_ratio > 0 or post_norm) and modality != "audio":
            raise ValueError(f"byol mixup_ratio/post_norm are BYOL-A's log-mel steps but the modality is "
                             f"{modality!r}; set them only for audio")
        self.mixup_ratio, self.post_norm = float(mixup_ratio), bool(post_norm)
        # Only BYOL-A's mixup has state, so plain BYOL runs keep their state_dict keys.
        self.mix_seeds = StepSeeds(seed) if self.mixup_ratio > 0 else None
        self.modality = modality
        self.tau_base = float(tau_base)
        self.tau = float(tau_base)
        self.backbone_name, self.backbone_args = backbone, dict(backbone_args)
        self.backbone = make_backbone(backbone, **backbone_args)
        self.projector = mlp_head(feature_dim(self.backbone, backbone), proj_hidden, proj_dim)
        self.predictor = mlp_head(proj_dim, pred_hidden or proj_hidden, proj_dim)
        self.target_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def forward(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        """Symmetric BYOL loss: each view's prediction against the target's projection of the other."""
        v1, v2 = batch_fields(batch, self.needs, "byol")
        if self.training and (self.mix_seeds is not None or self.post_norm):
            v1, v2 = byola_views(v1, v2, self.mix_seeds, self.mixup_ratio, self.post_norm)
        b = v1.shape[0]
        views = torch.cat([v1, v2])  # [2B, ...]
        h = self.backbone(views)  # [2B, D]
        p = self.predictor(self.projector(h))  # [2B, P]
        with torch.no_grad():
            z = self.target_projector(self.target_backbone(views))  # [2B, P]
        loss = byol_loss(p[:b], z[b:]) + byol_loss(p[b:], z[:b])
        return LossOutput(loss=loss, metrics={"tau": self.tau}, embedding=h[:b].detach())

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Decay on online weights only; the target takes no optimizer step."""
        return split_decay(list(self.named_parameters()), weight_decay)

    def after_step(self, step: int, total_steps: int) -> None:
        """Set tau by the cosine schedule, then move the target toward the online network."""
        self.tau = cosine_tau(self.tau_base, step, total_steps)
        if self.mix_seeds is not None:
            self.mix_seeds.after_step(step)
        ema_update(self.target_backbone, self.backbone, self.tau)
        ema_update(self.target_projector, self.projector, self.tau)

    def encoder(self) -> nn.Module:
        """The online backbone, which evaluation loads."""
        return self.backbone

    def encoder_spec(self) -> dict[str, Any]:
        """How to rebuild `encoder()` with make_backbone."""
        return {"backbone": self.backbone_name, "backbone_args": dict(self.backbone_args)}

    def mask_spec(self) -> Optional[dict[str, Any]]:
        """BYOL uses no masks."""
        return None
