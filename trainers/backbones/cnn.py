"""A small, fast CNN for 28–64 px images on CPUs."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from trainers.backbones import BACKBONES


def conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """3×3 conv (no bias: BatchNorm follows), BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ConvNetSmall(nn.Module):
    """Four stride-2 conv-BN-ReLU stages (widths w, 2w, 4w, 8w), global average pool."""

    def __init__(self, in_channels: int = 1, width: int = 32, out_dim: Optional[int] = None) -> None:
        super().__init__()
        if in_channels < 1 or width < 1:
            raise ValueError(f"convnet_small in_channels={in_channels}, width={width}; both must be positive")
        if out_dim is not None and out_dim < 1:
            raise ValueError(f"convnet_small out_dim={out_dim}; give a positive width or None for 8*width")
        widths = [width, 2 * width, 4 * width, 8 * width]
        stages, prev = [], in_channels
        for w in widths:
            stages.append(conv_bn_relu(prev, w, stride=2))
            prev = w
        self.features = nn.Sequential(*stages)
        # A Linear only when asked for another width, so the default has no extra parameters.
        self.proj: nn.Module = nn.Identity() if out_dim is None else nn.Linear(prev, out_dim)
        self.out_dim = prev if out_dim is None else out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features [B, out_dim] of images [B, C, H, W]."""
        if x.ndim != 4:
            raise ValueError(f"convnet_small takes images [B, C, H, W]; got shape {tuple(x.shape)}")
        h = self.features(x)  # [B, 8w, H/16, W/16]
        return self.proj(h.mean(dim=(2, 3)))  # [B, out_dim]


@BACKBONES.register("convnet_small")
def convnet_small(in_channels: int = 1, width: int = 32, out_dim: Optional[int] = None) -> ConvNetSmall:
    """A CPU-fast CNN for small images; `out_dim` defaults to 8 * width."""
    return ConvNetSmall(in_channels=in_channels, width=width, out_dim=out_dim)
