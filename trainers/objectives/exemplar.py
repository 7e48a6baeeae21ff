"""Exemplar-CNN (Dosovitskiy et al. 2015): every sample is its own surrogate class.

The class of a sample is its `sample_id`, its ordinal in the run snapshot (pipeline/snapshot.py),
so it is the same on any world size and across resumes. Both heavily augmented views (the
modality's two-view recipe, e.g. image `simclr`) are classified to that id. Rows with id -1
(padding, quarantined slots) take no part.

Two heads over the N = snapshot-size classes, chosen by `head` (default "auto"):
- "parametric": a softmax classifier, Linear(proj_dim → N), as in the paper. Its weights and their
  AdamW state grow with N × proj_dim (three copies), and each row pays an N-way softmax.
- "memory_bank": the non-parametric variant of Wu et al. 2018 (instance discrimination): a
  registered buffer of N unit vectors, one per sample, updated with momentum from the sample's
  features after each step, and an NCE loss against `num_negatives` uniform noise samples, so
  the cost per row is independent of N and nothing of N × D is optimized.
"auto" takes the parametric head up to `parametric_max` classes (32,768, about the largest
surrogate class count of the paper, where its accuracy had saturated) and the memory bank above,
where the parametric head's memory and per-step cost start to dominate a small backbone.

N reaches the objective as `num_classes`: the loop fills it from the run snapshot's sample count
(`sized_by_data`); the first batch checks every id is below it.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.trainers.backbones import make_backbone
from selfsup.trainers.objectives import OBJECTIVES
from selfsup.trainers.objectives.base import LossOutput, split_decay
from selfsup.trainers.objectives.heads import batch_fields, feature_dim, mlp_head, world_size

HEADS = ("auto", "parametric", "memory_bank")
PARAMETRIC_MAX = 32768


def surrogate_cross_entropy(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `logits` [B, N] against surrogate classes `ids` [B], over rows with id ≥ 0
    (0 when there are none, not NaN)."""
    keep = ids >= 0
    per_row = F.cross_entropy(logits.float(), ids.clamp(min=0), reduction="none")  # [B]
    return (per_row * keep).sum() / keep.sum().clamp(min=1)


def nce_loss(features: torch.Tensor, bank: torch.Tensor, ids: torch.Tensor, noise: torch.Tensor,
             temperature: float, z: torch.Tensor) -> torch.Tensor:
    """Wu et al. 2018's NCE loss of instance discrimination, mean over rows with id ≥ 0.

    P(i|f) = exp(f·v_i / τ) / Z against the memory v; with m noise samples from P_n = 1/N,
    h(i, f) = P(i|f) / (P(i|f) + m P_n) and the loss is -log h(id, f) - Σ_j log(1 - h(j, f)).

    Args:
        features: [B, D] unit features; bank: [N, D] unit memory; ids: [B] (-1: no part);
        noise: [B, m] sampled ids; z: the normalizing constant Z (a scalar tensor).
    """
    n, m = bank.shape[0], noise.shape[1]
    idx = torch.cat([ids.clamp(min=0)[:, None], noise], dim=1)  # [B, 1 + m]
    p = torch.exp(torch.einsum("bd,bkd->bk", features.float(), bank[idx].float()) / temperature) / z  # [B, 1 + m]
    mpn = m / n
    log_pos = torch.log(p[:, 0] / (p[:, 0] + mpn))  # [B]
    log_neg = torch.log(mpn / (p[:, 1:] + mpn)).sum(dim=1)  # [B]
    keep = ids >= 0
    return -((log_pos + log_neg) * keep).sum() / keep.sum().clamp(min=1)


def estimate_z(features: torch.Tensor, bank: torch.Tensor, noise: torch.Tensor, temperature: float) -> torch.Tensor:
    """Z ≈ N × mean of exp(f·v_j / τ) over the noise samples (Wu et al.: estimated once, then fixed)."""
    sims = torch.einsum("bd,bkd->bk", features.float(), bank[noise].float())  # [B, m]
    return torch.exp(sims / temperature).mean() * bank.shape[0]


def momentum_update(bank: torch.Tensor, ids: torch.Tensor, features: torch.Tensor, momentum: float) -> None:
    """v_i ← normalize(momentum · v_i + (1 - momentum) · f_i) for the rows with id ≥ 0 (in place)."""
    keep = ids >= 0
    i, f = ids[keep], features[keep].to(bank.dtype)
    bank[i] = F.normalize(momentum * bank[i] + (1 - momentum) * f, dim=1)


def resolve_head(head: str, num_classes: int, parametric_max: int) -> str:
    """The head "auto" stands for at N = `num_classes`; others as given."""
    if head not in HEADS:
        raise ValueError(f"exemplar head={head!r}; valid: {', '.join(HEADS)}")
    if head == "auto":
        return "parametric" if num_classes <= parametric_max else "memory_bank"
    return head


@OBJECTIVES.register("exemplar")
class ExemplarObjective(nn.Module):
    """Backbone + projector classifying both augmented views of a sample to its surrogate class."""

    needs: tuple[str, ...] = ("view1", "view2", "sample_id")
    sized_by_data = True  # the loop passes num_classes = the run snapshot's sample count
    bank: torch.Tensor  # [N, P] buffers of the memory-bank head
    z: torch.Tensor

    def __init__(self, modality: str, backbone: str, backbone_args: dict[str, Any],
                 num_classes: Optional[int] = None, head: str = "auto", parametric_max: int = PARAMETRIC_MAX,
                 proj_dim: int = 128, proj_hidden: Optional[int] = None, temperature: float = 0.07,
                 num_negatives: int = 4096, momentum: float = 0.5) -> None:
        super().__init__()
        if num_classes is None or num_classes < 1:
            raise ValueError(f"exemplar num_classes={num_classes}: it is the run snapshot's sample count, filled "
                             "by the training loop; set objective.args.num_classes when building it elsewhere")
        if temperature <= 0 or not 0 <= momentum < 1 or num_negatives < 1:
            raise ValueError(f"exemplar temperature={temperature} (> 0), momentum={momentum} (in [0, 1)), "
                             f"num_negatives={num_negatives} (≥ 1): fix the one out of range")
        self.num_classes, self.head = int(num_classes), resolve_head(head, int(num_classes), parametric_max)
        self.temperature, self.momentum, self.num_negatives = float(temperature), float(momentum), int(num_negatives)
        self.backbone_name, self.backbone_args = backbone, dict(backbone_args)
        self.backbone = make_backbone(backbone, **backbone_args)
        dim = feature_dim(self.backbone, backbone)
        self.projector = mlp_head(dim, proj_hidden or dim, proj_dim)
        self.checked = self.z_known = False
        if self.head == "parametric":
            self.classifier: Optional[nn.Linear] = nn.Linear(proj_dim, self.num_classes)
        else:
            self.classifier = None
            bank = torch.rand(self.num_classes, proj_dim) * 2 / math.sqrt(proj_dim / 3) - 1 / math.sqrt(proj_dim / 3)
            self.register_buffer("bank", F.normalize(bank, dim=1))  # [N, P]
            self.register_buffer("z", torch.tensor(-1.0))  # NCE's Z; < 0 until the first batch estimates it

    def forward(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        """Mean over both views of the surrogate-class loss (cross-entropy or NCE)."""
        v1, v2, ids = batch_fields(batch, self.needs, "exemplar")
        self._check(ids)
        b = v1.shape[0]
        h = self.backbone(torch.cat([v1, v2]))  # [2B, D]
        z = self.projector(h)  # [2B, P]
        both = torch.cat([ids, ids])  # [2B]
        if self.classifier is not None:
            loss = surrogate_cross_entropy(self.classifier(z), both)
        else:
            loss = self._nce(F.normalize(z.float(), dim=1), both, b)
        return LossOutput(loss=loss, embedding=h[:b].detach())

    def _nce(self, f: torch.Tensor, ids: torch.Tensor, b: int) -> torch.Tensor:
        """NCE against the memory bank, then the momentum update with the mean of both views' features."""
        noise = torch.randint(0, self.num_classes, (f.shape[0], self.num_negatives), device=f.device)  # [2B, m]
        if not self.z_known and float(self.z) < 0:  # once, as in the paper; in the state_dict for resumes
            self.z.fill_(_mean_over_ranks(estimate_z(f.detach(), self.bank, noise, self.temperature)))
        self.z_known = True  # a host sync on the first batch only
        loss = nce_loss(f, self.bank, ids, noise, self.temperature, self.z)
        if self.training:
            with torch.no_grad():
                mean = F.normalize(f[:b].detach() + f[b:].detach(), dim=1)  # [B, P]
                own, feats = _gathered(ids[:b], mean)
                momentum_update(self.bank, own, feats, self.momentum)
        return loss

    def _check(self, ids: torch.Tensor) -> None:
        """Once: every id below num_classes (one host sync on the first batch only)."""
        if self.checked:
            return
        top = int(ids.max()) if ids.numel() else -1
        if top >= self.num_classes:
            raise ValueError(f"exemplar: sample_id {top} ≥ num_classes={self.num_classes}; num_classes must be the "
                             "run snapshot's sample count (the loop fills it: leave objective.args.num_classes unset)")
        self.checked = True

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Decay on weights only."""
        return split_decay(list(self.named_parameters()), weight_decay)

    def after_step(self, step: int, total_steps: int) -> None:
        """The memory bank is updated in the forward pass; nothing else between steps."""

    def encoder(self) -> nn.Module:
        """The backbone evaluation loads."""
        return self.backbone

    def encoder_spec(self) -> dict[str, Any]:
        """How to rebuild `encoder()` with make_backbone."""
        return {"backbone": self.backbone_name, "backbone_args": dict(self.backbone_args)}

    def mask_spec(self) -> Optional[dict[str, Any]]:
        """Exemplar-CNN uses no masks."""
        return None


def _mean_over_ranks(x: torch.Tensor) -> float:
    """A scalar's mean over the ranks (so every rank fixes the same Z)."""
    if world_size() > 1:
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x)
        x /= world_size()
    return float(x)


def _gathered(ids: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (ids [W·B], features [W·B, P]), so each rank's bank gets the same update."""
    if world_size() == 1:
        return ids, features
    import torch.distributed as dist

    all_ids = [torch.empty_like(ids) for _ in range(world_size())]
    all_f = [torch.empty_like(features) for _ in range(world_size())]
    dist.all_gather(all_ids, ids.contiguous())
    dist.all_gather(all_f, features.contiguous())
    return torch.cat(all_ids), torch.cat(all_f)
