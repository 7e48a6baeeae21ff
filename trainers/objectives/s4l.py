"""S4L (Zhai et al. 2019): a self-supervised objective plus a supervised loss on the labeled rows.

    loss = L_ssl(batch) + supervised_weight × mean_{rows with label ≥ 0} CE(head(encoder(view)), label)

The self-supervised part is any registered two-view objective (`base`, default simclr) built by
composition and run on every row; the supervised head (linear, or an MLP with `head_hidden`)
sits on that objective's encoder and sees only rows whose `label` is ≥ 0. Labels come from the
run's labeled sources (`data.sources[].target`, pipeline/snapshot.py): rows of unlabeled sources
are -1, so the labeled fraction of a run is the labeled source's weight share. A batch without
labels adds 0 (not NaN). The encoder runs once more on the first view for the head: about half
a two-view step's forward cost more.

The encoder has seen labels: checkpoint metadata records `saw_labels`, and evaluation tables say so.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.trainers.objectives import OBJECTIVES, make_objective
from selfsup.trainers.objectives.base import LossOutput, Objective, as_module, split_decay
from selfsup.trainers.objectives.heads import feature_dim, mlp_head


def labeled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `logits` [B, K] over the rows with `labels` [B] ≥ 0; 0 when there are none."""
    keep = labels >= 0
    per_row = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none")  # [B]
    return (per_row * keep).sum() / keep.sum().clamp(min=1)


@OBJECTIVES.register("s4l")
class S4LObjective(nn.Module):
    """A self-supervised objective (`base`) and a supervised head on its encoder, trained jointly."""

    uses_labels = True  # checkpoint meta: saw_labels when the run also has a labeled source

    def __init__(self, modality: str, backbone: str, backbone_args: dict[str, Any], num_labels: int,
                 base: str = "simclr", base_args: Optional[dict[str, Any]] = None,
                 supervised_weight: float = 1.0, head_hidden: Optional[int] = None) -> None:
        super().__init__()
        if base == "s4l":
            raise ValueError("s4l base='s4l': the base must be a self-supervised objective (e.g. simclr, byol)")
        if num_labels < 2 or supervised_weight < 0:
            raise ValueError(f"s4l num_labels={num_labels} (the classes of the labeled source, ≥ 2), "
                             f"supervised_weight={supervised_weight} (≥ 0): fix the one out of range")
        self.base: Objective = make_objective(base, modality=modality, backbone=backbone,
                                              backbone_args=backbone_args, **dict(base_args or {}))
        as_module(self.base)  # an nn.Module, so a submodule: its state is in this one's state_dict
        self.view = next(n for n in getattr(self.base, "needs", ("view1",)) if n != "mask")
        self.num_labels, self.supervised_weight = int(num_labels), float(supervised_weight)
        dim = feature_dim(self.base.encoder(), backbone)
        self.head = mlp_head(dim, head_hidden, num_labels) if head_hidden else nn.Linear(dim, num_labels)
        self.checked = False

    def forward(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        """The base objective's loss on every row plus the weighted supervised loss on labeled rows."""
        out = self.base(batch)
        x = batch[self.view]
        labels = batch.get("label")
        if labels is None:  # no labeled source in the run: every row unlabeled
            labels = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        self._check(labels)
        sup = labeled_cross_entropy(self.head(self.base.encoder()(x)), labels)  # head always used (DDP)
        metrics = {**out.metrics, "ssl_loss": float(out.loss.detach()), "sup_loss": float(sup.detach()),
                   "labeled_frac": float((labels >= 0).float().mean())}
        return LossOutput(loss=out.loss + self.supervised_weight * sup, metrics=metrics, embedding=out.embedding)

    def _check(self, labels: torch.Tensor) -> None:
        """Once: every label below num_labels."""
        if self.checked:
            return
        top = int(labels.max()) if labels.numel() else -1
        if top >= self.num_labels:
            raise ValueError(f"s4l: label {top} ≥ num_labels={self.num_labels}; set objective.args.num_labels "
                             "to the labeled source's class count")
        self.checked = True

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The base objective's groups, and the head's with decay on weights only."""
        return self.base.param_groups(weight_decay) + split_decay(list(self.head.named_parameters()), weight_decay)

    def after_step(self, step: int, total_steps: int) -> None:
        """The base objective's update (EMA targets, temperatures)."""
        self.base.after_step(step, total_steps)

    def encoder(self) -> nn.Module:
        """The base objective's encoder."""
        return self.base.encoder()

    def encoder_spec(self) -> dict[str, Any]:
        """How to rebuild the base objective's encoder."""
        return self.base.encoder_spec()

    def mask_spec(self) -> Optional[dict[str, Any]]:
        """The base objective's masks."""
        return self.base.mask_spec()
