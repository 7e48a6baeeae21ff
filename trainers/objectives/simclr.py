"""SimCLR (Chen et al. 2020): NT-Xent over the 2B projected views, negatives from every rank."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from selfsup.trainers.backbones import make_backbone
from selfsup.trainers.objectives import OBJECTIVES
from selfsup.trainers.objectives.base import LossOutput, split_decay
from selfsup.trainers.objectives.heads import batch_fields, feature_dim, mlp_head, world_size


def nt_xent_local(
    q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, offset: int, temperature: float
) -> torch.Tensor:
    """NT-Xent of local anchors against (possibly gathered) keys, mean over the 2B local anchors.

    Args:
        q1, q2: this rank's two views [B, D]; k1, k2: every rank's views [M, D] (M = world * B),
            holding q1, q2 at rows offset..offset+B.
    """
    if temperature <= 0:
        raise ValueError(f"NT-Xent temperature={temperature}; it must be > 0 (SimCLR uses 0.1–0.5)")
    b, m = q1.shape[0], k1.shape[0]
    q = F.normalize(torch.cat([q1, q2]).float(), dim=1)  # [2B, D]
    k = F.normalize(torch.cat([k1, k2]).float(), dim=1)  # [2M, D]
    logits = q @ k.T / temperature  # [2B, 2M]
    local = torch.arange(b, device=q.device) + offset  # [B] rows of this rank's samples among the keys
    self_cols = torch.cat([local, local + m])  # [2B] each anchor's own column
    pos_cols = torch.cat([local + m, local])  # [2B] its other view
    rows = torch.arange(2 * b, device=q.device)
    logits = logits.index_put((rows, self_cols), torch.tensor(float("-inf"), device=q.device))
    return F.cross_entropy(logits, pos_cols)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent loss of paired views z1, z2 [B, D] (cosine similarity, each view an anchor once)."""
    return nt_xent_local(z1, z2, z1, z2, 0, temperature)


def nt_xent_distributed(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent with negatives from all ranks; gradients flow back through the gather."""
    if world_size() == 1:
        return nt_xent(z1, z2, temperature)
    from torch.distributed.nn.functional import all_gather

    k1 = torch.cat(all_gather(z1.contiguous()))  # [W*B, D]
    k2 = torch.cat(all_gather(z2.contiguous()))
    # Ranks must hold equal batches (the planner guarantees it), so rank r's rows start at r*B.
    return nt_xent_local(z1, z2, k1, k2, dist.get_rank() * z1.shape[0], temperature)


@OBJECTIVES.register("simclr")
class SimCLRObjective(nn.Module):
    """Backbone + MLP projector trained with NT-Xent between two augmented views."""

    needs: tuple[str, ...] = ("view1", "view2")

    def __init__(
        self,
        modality: str,
        backbone: str,
        backbone_args: dict[str, Any],
        temperature: float = 0.1,
        proj_dim: int = 128,
        proj_hidden: Optional[int] = None,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"simclr temperature={temperature}; it must be > 0 (SimCLR uses 0.1–0.5)")
        self.modality = modality
        self.temperature = float(temperature)
        self.backbone_name, self.backbone_args = backbone, dict(backbone_args)
        self.backbone = make_backbone(backbone, **backbone_args)
        dim = feature_dim(self.backbone, backbone)
        self.projector = mlp_head(dim, proj_hidden or dim, proj_dim)

    def forward(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        """NT-Xent loss of the two views' projections."""
        v1, v2 = batch_fields(batch, self.needs, "simclr")
        b = v1.shape[0]
        h = self.backbone(torch.cat([v1, v2]))  # [2B, D]; one pass so BatchNorm sees both views
        z = self.projector(h)  # [2B, P]
        loss = nt_xent_distributed(z[:b], z[b:], self.temperature)
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
        """SimCLR uses no masks."""
        return None
