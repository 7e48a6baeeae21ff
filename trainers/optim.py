"""Optimizers (AdamW, LARS) and the warmup-then-cosine learning-rate schedule."""
from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Sequence

import torch

log = logging.getLogger(__name__)


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios (You et al. 2017), as in SimCLR/BYOL.

    Groups flagged `lars_exclude` (biases, norms) skip the trust ratio and weight decay scaling.
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta,
                                  "lars_exclude": False})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102 - torch.optim.Optimizer.step
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not group["lars_exclude"]:
                    g = g.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.norm(p), torch.norm(g)
                    trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm,
                                        torch.ones_like(w_norm))
                    g = g.mul(trust)
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.clone(g).detach()
                else:
                    buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])
        return loss


def build_optimizer(name: str, groups: list[dict[str, Any]], lr: float, weight_decay: float,
                    betas: Sequence[float], momentum: float, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW or LARS over the objective's parameter groups; `betas` is AdamW's (beta1, beta2);
    `fused`: AdamW's fused kernel where the parameters' device has one (else the default, with a warning)."""
    if name == "adamw":
        clean = [{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups]
        beta1, beta2 = betas
        if fused:
            try:
                return torch.optim.AdamW(clean, lr=lr, betas=(beta1, beta2), weight_decay=weight_decay, fused=True)
            except (RuntimeError, ValueError) as e:  # a device without the fused kernel
                log.warning("train.fused_adamw: no fused AdamW here (%s); using the default one", e)
        return torch.optim.AdamW(clean, lr=lr, betas=(beta1, beta2), weight_decay=weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; valid: adamw, lars")


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from `peak` down to `floor` at `total`."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr
