"""Hyper-parameters that follow the global batch, as the papers scale them.

A recipe gives per-GPU values: the micro-batch (`data.batch_size`), a base learning rate per
`train.lr_batch` samples (`train.base_lr`, MAE's `blr`), and the run's length and warmup in
samples (`train.samples`, `train.warmup_samples`: epochs × dataset size). With W workers the
global batch is batch_size × accum × W; the learning rate grows with it (linear: Goyal et al.
2017, used by SimCLR, BYOL, Barlow Twins, MAE and VideoMAE; or sqrt), and the step counts
shrink with it, so 8 GPUs see the same number of epochs with the same warmup as 1 GPU does.

    cfg = resolve(cfg, world)       # train.lr, steps, warmup_steps filled in; idempotent per world

Fields left unset keep their given values (a recipe without base_lr keeps its fixed lr).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from selfsup.trainers.config import PretrainConfig


def global_batch(cfg: PretrainConfig, world: int) -> int:
    """Samples per optimizer step across all ranks."""
    return cfg.data.batch_size * cfg.train.accum * world


def scaled_lr(base_lr: float, batch: int, lr_batch: int, rule: str) -> float:
    """base_lr at `lr_batch` scaled to `batch`: linearly, or by the square root of the ratio."""
    ratio = batch / lr_batch
    return base_lr * (math.sqrt(ratio) if rule == "sqrt" else ratio)


def resolve(cfg: PretrainConfig, world: int) -> PretrainConfig:
    """`cfg` with train.lr, train.steps and train.warmup_steps derived for `world` ranks (where the
    recipe gives base_lr, samples, warmup_samples); the recipe's own fields are kept, so resolving
    again, for the same or another world size, starts from them."""
    t, batch = cfg.train, global_batch(cfg, world)
    changes: dict[str, Any] = {}
    if t.base_lr is not None:
        changes["lr"] = scaled_lr(t.base_lr, batch, t.lr_batch, t.lr_scaling)
    if t.samples is not None:
        changes["steps"] = max(1, math.ceil(t.samples / batch))
    if t.warmup_samples is not None:
        changes["warmup_steps"] = round(t.warmup_samples / batch)
    if not changes:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(t, **changes))


def hyper_parameters(cfg: PretrainConfig, world: int) -> dict[str, Any]:
    """The resolved values a run trains with at `world` ranks (for the start line and `--show-scaling`)."""
    r, batch = resolve(cfg, world).train, global_batch(cfg, world)
    return {"workers": world, "batch_per_worker": cfg.data.batch_size, "accum": cfg.train.accum,
            "global_batch": batch, "lr": r.lr, "base_lr": cfg.train.base_lr,
            "lr_rule": f"{cfg.train.lr_scaling} per {cfg.train.lr_batch}" if cfg.train.base_lr else "fixed",
            "warmup_steps": r.warmup_steps, "steps": r.steps, "samples": r.steps * batch,
            "optimizer": cfg.train.optimizer, "weight_decay": cfg.train.weight_decay}


def describe(hp: dict[str, Any]) -> str:
    """One line: how the values follow from the recipe."""
    if hp["base_lr"] is not None:
        rule = hp["lr_rule"].split()[0]
        ratio = f"{hp['global_batch']}/{hp['lr_rule'].split()[-1]}"
        how = f"base_lr {hp['base_lr']:g} × {'sqrt(' + ratio + ')' if rule == 'sqrt' else ratio}"
    else:
        how = "fixed"
    return (f"{hp['workers']} worker(s) × batch {hp['batch_per_worker']} × accum {hp['accum']} = global batch "
            f"{hp['global_batch']}; lr {hp['lr']:.6g} ({how}); warmup {hp['warmup_steps']} steps; "
            f"{hp['steps']} steps ({hp['samples']} samples); {hp['optimizer']}, weight decay {hp['weight_decay']:g}")
