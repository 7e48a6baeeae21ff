"""A small (2+1)D CNN for video clips (Tran et al., 2018): spatial 1x3x3 then temporal 3x1x1 convs.

Time keeps full resolution through the stem and the first block, so motion is seen frame to
frame; the last two blocks halve it, and only the final global pool reduces it to one.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from selfsup.trainers.backbones import BACKBONES


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> list[nn.Module]:
    """Conv3d (same padding) → BN → ReLU."""
    pad = (kernel[0] // 2, kernel[1] // 2, kernel[2] // 2)
    return [nn.Conv3d(in_ch, out_ch, kernel, stride, pad, bias=False), nn.BatchNorm3d(out_ch), nn.ReLU(inplace=True)]


def _block(in_ch: int, out_ch: int, t_stride: int) -> nn.Sequential:
    """(2+1)D block: 1x3x3 conv with spatial stride 2, then 3x1x1 conv with temporal stride `t_stride`."""
    return nn.Sequential(
        *_conv_bn_relu(in_ch, out_ch, (1, 3, 3), (1, 2, 2)),
        *_conv_bn_relu(out_ch, out_ch, (3, 1, 1), (t_stride, 1, 1)),
    )


class VideoCNN(nn.Module):
    """Clip [B, C, T, H, W] → four (2+1)D blocks → global average pool → [B, out_dim]."""

    def __init__(self, in_channels: int, width: int, out_dim: Optional[int]) -> None:
        super().__init__()
        self.in_channels = in_channels
        w = width
        self.blocks = nn.Sequential(
            _block(in_channels, w, 1),  # [B, w, T, H/2, W/2]
            _block(w, 2 * w, 1),  # [B, 2w, T, H/4, W/4]
            _block(2 * w, 4 * w, 2),  # [B, 4w, T/2, H/8, W/8]
            _block(4 * w, 8 * w, 2),  # [B, 8w, T/4, H/16, W/16]
        )
        self.head: nn.Module = nn.Linear(8 * w, out_dim) if out_dim else nn.Identity()
        self.out_dim = out_dim or 8 * w

    def forward(self, video: Tensor) -> Tensor:
        """video [B, C, T, H, W] → [B, out_dim]."""
        if video.ndim != 5 or video.shape[1] != self.in_channels:
            raise ValueError(
                f"video_cnn_small expects [B, {self.in_channels}, T, H, W], got {tuple(video.shape)}; "
                "put channels before time (the loop's layout) or set backbone_args.in_channels"
            )
        x = self.blocks(video)  # [B, 8w, T', H', W']
        return self.head(x.mean((2, 3, 4)))


@BACKBONES.register("video_cnn_small")
def video_cnn_small(in_channels: int = 3, width: int = 16, out_dim: Optional[int] = None) -> VideoCNN:
    """(2+1)D CNN for clips [B, C, T, H, W]; out_dim defaults to 8 * width (no head)."""
    if width < 1 or in_channels < 1:
        raise ValueError(f"width={width} and in_channels={in_channels} must be >= 1")
    return VideoCNN(in_channels, width, out_dim)
