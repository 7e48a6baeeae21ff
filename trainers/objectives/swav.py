"""SwAV (Caron et al. 2020): online clustering; each crop predicts the Sinkhorn codes of the global crops.

Follows facebookresearch/swav `main_swav.py`: a projection MLP and L2-normalized embeddings z,
prototypes C (a bias-free Linear whose rows are re-normalized every step), scores z·C. For each of
the two global crops, codes q come from `distributed_sinkhorn` on its scores (no gradient), and
every other crop — the other global one and the `local` multi-crops — predicts them through a
softmax at `temperature`. Prototypes get zero gradient for the first `freeze_prototypes_steps`.

Queue (small batches): once `queue_start_step` steps are done, each step's global-crop embeddings of
all ranks are pushed to a queue of `queue_length` rows, identical on every rank (so DDP's buffer
broadcast and a rank-0 checkpoint keep it whole); once full, rank r adds its 1/W slice of the queue's
scores to Sinkhorn, so the world clusters the batch plus the whole queue once — as the paper's
per-rank queues of queue_length / W rows do.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from selfsup.trainers.backbones import make_backbone
from selfsup.trainers.objectives import OBJECTIVES
from selfsup.trainers.objectives.barlow_twins import global_sum
from selfsup.trainers.objectives.base import LossOutput, split_decay
from selfsup.trainers.objectives.heads import batch_fields, feature_dim, mlp_head, world_size


def global_max(x: torch.Tensor) -> torch.Tensor:
    """Max of `x` over all ranks (no gradient), `x` itself on one process."""
    if world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


@torch.no_grad()
def distributed_sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Codes Q [N, K] of scores [N, K] (this rank's rows): the paper's Algorithm, summed over ranks.

    Q = exp(scores / ε)ᵀ rescaled so each prototype row sums to 1/K and each sample column to 1/N_all,
    `iterations` times; returned with columns summing to 1 (each row of the result is an assignment).
    Computed in float64 after subtracting the global max score (a constant: the first
    normalization cancels it), so small ε neither overflows nor empties a column.
    """
    s = scores.double()
    q = torch.exp((s - global_max(s.max())) / epsilon).T  # [K, N]
    k = q.shape[0]
    n_all = global_sum(torch.tensor(float(q.shape[1]), dtype=torch.float64, device=q.device))
    q /= global_sum(q.sum())
    for _ in range(iterations):
        q /= global_sum(q.sum(dim=1, keepdim=True))  # rows: each prototype's total weight
        q /= k  # ... becomes 1/K
        q /= q.sum(dim=0, keepdim=True)  # columns: each sample's total weight
        q /= n_all  # ... becomes 1/N_all
    q *= n_all  # columns sum to 1: assignments
    return q.T.to(torch.promote_types(scores.dtype, torch.float32))  # [N, K]; float32 for bf16 scores


def swapped_prediction_loss(scores: list[torch.Tensor], codes: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Mean over assigned crops i of the mean over crops v ≠ i of -Σ_k q_i log softmax(s_v / τ)_k.

    Args:
        scores: per crop, prototype scores [B, K] (the assigned crops first, in the order of `codes`).
        codes: per assigned crop i, Sinkhorn codes [B, K] of scores[i].
    """
    if len(scores) < 2:
        raise ValueError(f"swapped prediction needs at least two crops, got {len(scores)}")
    total = scores[0].new_zeros(())
    for i, q in enumerate(codes):
        sub = [-(q * F.log_softmax(s / temperature, dim=1)).sum(dim=1).mean()
               for v, s in enumerate(scores) if v != i]
        total = total + torch.stack(sub).mean()
    return total / len(codes)


def check_swav_args(num_prototypes: int, temperature: float, epsilon: float, sinkhorn_iterations: int,
                    queue_length: int, queue_start_step: int, freeze_prototypes_steps: int) -> None:
    """ValueError naming the first SwAV argument out of range and the range it must lie in."""
    checks = [
        (num_prototypes >= 1, f"swav num_prototypes={num_prototypes}; give a positive count (paper: 3000)"),
        (temperature > 0, f"swav temperature={temperature}; it must be > 0 (paper: 0.1)"),
        (epsilon > 0, f"swav epsilon={epsilon}; it must be > 0 (paper: 0.05)"),
        (sinkhorn_iterations >= 1, f"swav sinkhorn_iterations={sinkhorn_iterations}; give 1 or more (paper: 3)"),
        (queue_length >= 0, f"swav queue_length={queue_length}; give 0 (no queue) or a row count (paper: 3840)"),
        (queue_start_step >= 0, f"swav queue_start_step={queue_start_step}; it must be >= 0"),
        (freeze_prototypes_steps >= 0, f"swav freeze_prototypes_steps={freeze_prototypes_steps}; it must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows [W*B, D] of x [B, D] (rank order, no gradient)."""
    if world_size() == 1:
        return x
    out = x.new_empty((world_size() * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous())
    return out


def rank_slice(rows: torch.Tensor) -> torch.Tensor:
    """This rank's share of rows [N, D] that every rank holds alike."""
    if world_size() == 1:
        return rows
    return torch.tensor_split(rows, world_size())[dist.get_rank()]


def forget_host_state(module: nn.Module, incompatible_keys: Any) -> None:
    """After load_state_dict: the host copies of the step count and queue fill are read again from the buffers."""
    setattr(module, "_host", None)


@OBJECTIVES.register("swav")
class SwAVObjective(nn.Module):
    """Backbone + projector + normalized prototypes; swapped prediction of Sinkhorn codes across crops."""

    needs: tuple[str, ...] = ("view1", "view2")  # and `local` [B, K, ...] when the modality makes it
    queue: torch.Tensor  # buffer [2, L, P]
    steps_done: torch.Tensor  # buffer [], long

    def __init__(
        self,
        modality: str,
        backbone: str,
        backbone_args: dict[str, Any],
        num_prototypes: int = 3000,
        proj_dim: int = 128,
        proj_hidden: int = 2048,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        queue_length: int = 0,
        queue_start_step: int = 0,
        freeze_prototypes_steps: int = 313,
    ) -> None:
        super().__init__()
        check_swav_args(num_prototypes, temperature, epsilon, sinkhorn_iterations, queue_length,
                        queue_start_step, freeze_prototypes_steps)
        self.modality = modality
        self.temperature, self.epsilon, self.iterations = float(temperature), float(epsilon), int(sinkhorn_iterations)
        self.queue_start_step, self.freeze_steps = int(queue_start_step), int(freeze_prototypes_steps)
        self.backbone_name, self.backbone_args = backbone, dict(backbone_args)
        self.backbone = make_backbone(backbone, **backbone_args)
        self.projector = mlp_head(feature_dim(self.backbone, backbone), proj_hidden, proj_dim)
        self.prototypes = nn.Linear(proj_dim, num_prototypes, bias=False)
        self.normalize_prototypes()
        # Buffers, so a checkpoint keeps them: the queue of global-crop embeddings and the steps done.
        self.register_buffer("queue", torch.zeros(2, int(queue_length), proj_dim))  # [2, L, P]
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self._host: Optional[tuple[int, int]] = None  # (steps done, queue rows filled), read from the buffers once
        self.register_load_state_dict_post_hook(forget_host_state)

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Rows of the prototype matrix to unit length (the paper does it before every step)."""
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1))

    def host_state(self) -> tuple[int, int]:
        """(steps done, queue rows filled) on the host; read from the buffers after a build or a load."""
        if self._host is None:
            filled = int((self.queue[0].abs().sum(dim=1) > 0).sum()) if self.queue.shape[1] else 0
            self._host = (int(self.steps_done), filled)
        return self._host

    def forward(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        """SwAV loss over the two global crops and any `local` crops [B, K, ...]."""
        v1, v2 = batch_fields(batch, self.needs, "swav")
        b = v1.shape[0]
        if self.training:
            self.normalize_prototypes()
        h = self.backbone(torch.cat([v1, v2]))  # [2B, D]; crops of one size share a pass (and BatchNorm)
        feats = [h]
        local = batch.get("local")
        if local is not None and local.shape[1] > 0:
            crops = local.transpose(0, 1).reshape(-1, *local.shape[2:])  # [K*B, ...], crop-major
            feats.append(self.backbone(crops))
        z = F.normalize(self.projector(torch.cat(feats)), dim=1)  # [(2+K)*B, P]
        steps, filled = self.host_state()
        scores = F.linear(z, self.gated_prototypes(steps)).split(b)  # per crop [B, Kp]
        codes = [self.codes(i, scores[i].detach(), z[i * b:(i + 1) * b].detach()) for i in range(2)]
        loss = swapped_prediction_loss(list(scores), codes, self.temperature)
        metrics = {"prototypes_frozen": float(steps < self.freeze_steps),
                   "queue_used": float(0 < self.queue.shape[1] <= filled)}
        return LossOutput(loss=loss, metrics=metrics, embedding=h[:b].detach())

    def gated_prototypes(self, steps: int) -> torch.Tensor:
        """The prototype matrix [Kp, P]; while frozen, a copy whose gradient reaches the prototypes as zeros.

        Zeros rather than no gradient: the prototypes still take part (DDP expects every parameter to).
        """
        w = self.prototypes.weight
        if self.training and steps < self.freeze_steps and w.requires_grad:
            w = w.clone()
            w.register_hook(torch.zeros_like)
        return w

    @torch.no_grad()
    def codes(self, crop: int, scores: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Sinkhorn codes [B, Kp] of one global crop: with the queue's scores once it is full; then enqueue z."""
        steps, filled = self.host_state()
        length = self.queue.shape[1]
        if 0 < length <= filled:
            queued = rank_slice(self.queue[crop]) @ self.prototypes.weight.T  # [L/W, Kp]
            scores = torch.cat([queued, scores])
        q = distributed_sinkhorn(scores, self.epsilon, self.iterations)[-z.shape[0]:]
        if self.training and length and steps >= self.queue_start_step:
            new = gather_rows(z)[:length]  # [min(W*B, L), P], newest first
            self.queue[crop] = torch.cat([new, self.queue[crop, : length - new.shape[0]]])
            if crop == 1:
                self._host = (steps, min(filled + new.shape[0], length))
        return q

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Decay on weights (prototypes included, as in the paper's LARS), none on biases and norms."""
        return split_decay(list(self.named_parameters()), weight_decay)

    def after_step(self, step: int, total_steps: int) -> None:
        """Count the step (prototype freeze, queue start), in the buffer too so a resume keeps it."""
        self.steps_done.fill_(step)
        self._host = (step, self.host_state()[1])

    def encoder(self) -> nn.Module:
        """The backbone evaluation loads."""
        return self.backbone

    def encoder_spec(self) -> dict[str, Any]:
        """How to rebuild `encoder()` with make_backbone."""
        return {"backbone": self.backbone_name, "backbone_args": dict(self.backbone_args)}

    def mask_spec(self) -> Optional[dict[str, Any]]:
        """SwAV uses no masks."""
        return None
