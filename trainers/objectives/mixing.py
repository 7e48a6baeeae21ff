"""Batch-level mixing on the device, seeded per step: Mixed Barlow Twins' input mixup and BYOL-A's
background mixup and post-normalization.

These augmentations need other samples of the batch, which the pipeline's per-sample views never
see, so the objective applies them to the batch on its device. Their randomness never touches
torch's global RNG: `StepSeeds` hands out CPU `torch.Generator`s seeded by a stable hash of
(tag, seed, step, call), where `step` is the optimizer steps done (kept in the objective's state_dict
as `<name>._extra_state`, so a resumed run draws what an unbroken one would) and `call` counts the
forward calls since the last step (micro-batches of gradient accumulation). The draws do not depend
on the rank: every rank mixes its own rows with the same λ and the same permutation pattern.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from selfsup.pipeline.seeding import stable_hash
from selfsup.trainers.objectives.heads import global_sum, world_size

LOG_EPS = float(torch.finfo(torch.float32).eps)  # BYOL-A's log_mixup_exp adds float32's eps


class StepSeeds(nn.Module):
    """Per-step, per-call CPU generators; its step travels in the state_dict (no parameters, no buffers)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed, self.step, self.calls = int(seed), 0, 0

    def generator(self, tag: str) -> torch.Generator:
        """The next generator for `tag`: a pure function of (tag, seed, step, call)."""
        g = torch.Generator().manual_seed(stable_hash(tag, self.seed, self.step, self.calls) % 2**63)
        self.calls += 1
        return g

    def after_step(self, step: int) -> None:
        """Steps done so far; the calls of the next step count from zero."""
        self.step, self.calls = int(step), 0

    def get_extra_state(self) -> dict[str, int]:
        """What a checkpoint keeps: the step (plain ints, loadable with weights_only=True)."""
        return {"seed": self.seed, "step": self.step}

    def set_extra_state(self, state: Any) -> None:
        """Resume at the checkpoint's step (the seed stays the config's)."""
        self.step, self.calls = int(state["step"]), 0


def draw_mixup(g: torch.Generator, b: int) -> tuple[float, torch.Tensor]:
    """Mixed Barlow Twins' draw: λ ~ Beta(1, 1) (= U(0, 1)) and a permutation of the b rows [B]."""
    lam = float(torch.rand((), generator=g))
    return lam, torch.randperm(b, generator=g)


def mix_inputs(x1: torch.Tensor, x2: torch.Tensor, lam: float, perm: torch.Tensor) -> torch.Tensor:
    """λ·x1 + (1 - λ)·x2[perm]: view 1 mixed with a shuffled view 2 [B, ...]."""
    return lam * x1 + (1 - lam) * x2[perm.to(x2.device)]


def log_mixup_exp(x: torch.Tensor, bg: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """log((1 - α)·exp(x) + α·exp(bg) + eps): BYOL-A's mix of log-mel spectrograms in the linear domain.

    x, bg [B, F, T] (normalized log-mel), alpha [B] the background's share per row.
    """
    a = alpha.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return torch.log((1 - a) * x.exp() + a * bg.exp() + LOG_EPS)


def background_mixup(x: torch.Tensor, g: torch.Generator, ratio: float) -> torch.Tensor:
    """BYOL-A's Mixup with another row of the batch as background: α ~ U(0, ratio) per row [B, F, T]."""
    b = x.shape[0]
    if b < 2:
        raise ValueError(f"BYOL-A mixup takes its background from the batch but this batch has {b} row; "
                         "use data.batch_size >= 2 per rank or objective.args.mixup_ratio=0")
    alpha = ratio * torch.rand(b, generator=g)  # [B]
    shift = torch.randint(1, b, (b,), generator=g)  # another row, never the row itself
    index = ((torch.arange(b) + shift) % b).to(x.device)
    return log_mixup_exp(x, x[index], alpha)


def batch_post_norm(x: torch.Tensor, eps: float = LOG_EPS) -> torch.Tensor:
    """BYOL-A's NormalizeBatch: (x - mean) / std over every element of the global batch [N, F, T].

    The std is unbiased as torch.std's (BYOL-A clamps it at float32's eps); ranks all-reduce the sums.
    """
    count = x.numel() * world_size()  # ranks hold equal batches
    mean = global_sum(x.sum()) / count
    var = global_sum((x - mean).square().sum()) / max(count - 1, 1)
    return (x - mean) / var.sqrt().clamp_min(eps)


def byola_views(v1: torch.Tensor, v2: torch.Tensor, seeds: "StepSeeds | None", ratio: float,
                post_norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """BYOL-A's batch steps on two log-mel views [B, F, T]: background mixup of each view (when `seeds`),
    then one normalization over both views together (when `post_norm`)."""
    if seeds is not None:
        v1 = background_mixup(v1, seeds.generator("byola_mixup"), ratio)
        v2 = background_mixup(v2, seeds.generator("byola_mixup"), ratio)
    if post_norm:
        b = v1.shape[0]
        both = batch_post_norm(torch.cat([v1, v2]))  # [2B, F, T]
        v1, v2 = both[:b], both[b:]
    return v1, v2
