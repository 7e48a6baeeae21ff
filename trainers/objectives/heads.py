"""Pieces the objectives share: projection/prediction MLPs, batch fields, feature width, world size, sums
over ranks."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, last_bias: bool = True) -> nn.Sequential:
    """`num_layers - 1` Linear-BN-ReLU blocks then a Linear: the SimCLR/BYOL/Barlow Twins projector.

    Hidden Linears carry no bias (the BatchNorm after them would cancel it); `last_bias=False`
    suits heads whose output is batch-normalized again (Barlow Twins).
    """
    if num_layers < 1:
        raise ValueError(f"mlp_head num_layers={num_layers}; use 1 (a single Linear) or more")
    for label, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
        if value < 1:
            raise ValueError(f"mlp_head {label}={value}; it must be a positive width")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=last_bias))
    return nn.Sequential(*layers)


def batch_fields(batch: Mapping[str, torch.Tensor], names: Sequence[str], objective: str) -> list[torch.Tensor]:
    """The batch tensors called `names`; a missing one raises naming what the batch holds."""
    missing = [n for n in names if n not in batch]
    if missing:
        raise ValueError(
            f"{objective} needs batch fields {list(names)} but the batch lacks {missing} "
            f"(it holds {sorted(batch)}); make the data modality produce them (e.g. two views)"
        )
    return [batch[n] for n in names]


def feature_dim(backbone: nn.Module, name: str) -> int:
    """The backbone's `out_dim`; raises when a backbone does not declare it."""
    dim = getattr(backbone, "out_dim", None)
    if not isinstance(dim, int):
        raise ValueError(f"backbone {name!r} has no integer `out_dim`; every registered backbone must set one")
    return dim


def world_size() -> int:
    """The number of ranks in the default process group, 1 when torch.distributed is not running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def global_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over all ranks (differentiable), `x` itself on one process."""
    if world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x)
