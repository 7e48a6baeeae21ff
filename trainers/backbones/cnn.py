"""A small, fast CNN for 28–64 px images on CPUs."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.trainers.backbones import BACKBONES


def conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """3×3 conv (no bias: BatchNorm follows), BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


POOLS = ("mean", "max", "cat", "grid")


class ConvNetSmall(nn.Module):
    """Four conv-BN-ReLU stages (widths w, 2w, 4w, 8w), stride 2 each, then a global pool.

    `pool`: "mean" (average), "max", "cat" ([max, mean] side by side, twice the width) or "grid"
    (average-pooled to a 2 × 2 grid and flattened, four times the width: keeps coarse layout).

    `first_stride=1` keeps the first stage at full resolution (28 px → 28, 14, 7, 4 instead of
    14, 7, 4, 2): about 3.5× the FLOPs, and a last feature map large enough to hold layout.
    """

    def __init__(self, in_channels: int = 1, width: int = 32, out_dim: Optional[int] = None,
                 first_stride: int = 2, pool: str = "mean") -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"convnet_small pool={pool!r} unknown; valid: {', '.join(POOLS)}")
        if in_channels < 1 or width < 1:
            raise ValueError(f"convnet_small in_channels={in_channels}, width={width}; both must be positive")
        if first_stride not in (1, 2):
            raise ValueError(f"convnet_small first_stride={first_stride}; give 1 or 2")
        if out_dim is not None and out_dim < 1:
            raise ValueError(f"convnet_small out_dim={out_dim}; give a positive width or None for 8*width")
        widths = [width, 2 * width, 4 * width, 8 * width]
        stages, prev = [], in_channels
        for i, w in enumerate(widths):
            stages.append(conv_bn_relu(prev, w, stride=first_stride if i == 0 else 2))
            prev = w
        self.features = nn.Sequential(*stages)
        self.pool = pool
        prev *= {"cat": 2, "grid": 4}.get(pool, 1)
        # A Linear only when asked for another width, so the default has no extra parameters.
        self.proj: nn.Module = nn.Identity() if out_dim is None else nn.Linear(prev, out_dim)
        self.out_dim = prev if out_dim is None else out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features [B, out_dim] of images [B, C, H, W]."""
        if x.ndim != 4:
            raise ValueError(f"convnet_small takes images [B, C, H, W]; got shape {tuple(x.shape)}")
        h = self.features(x)  # [B, 8w, H/16, W/16] (H/8, W/8 with first_stride=1)
        if self.pool == "mean":
            pooled = h.mean(dim=(2, 3))
        elif self.pool == "max":
            pooled = h.amax(dim=(2, 3))
        elif self.pool == "cat":
            pooled = torch.cat([h.amax(dim=(2, 3)), h.mean(dim=(2, 3))], dim=1)
        else:
            pooled = F.adaptive_avg_pool2d(h, 2).flatten(1)
        return self.proj(pooled)  # [B, out_dim]


@BACKBONES.register("convnet_small")
def convnet_small(in_channels: int = 1, width: int = 32, out_dim: Optional[int] = None,
                  first_stride: int = 2, pool: str = "mean") -> ConvNetSmall:
    """A CPU-fast CNN for small images; `out_dim` defaults to 8 * width (× 2 with pool="cat", × 4 with "grid")."""
    return ConvNetSmall(in_channels=in_channels, width=width, out_dim=out_dim, first_stride=first_stride,
                        pool=pool)
