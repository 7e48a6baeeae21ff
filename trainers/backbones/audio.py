"""A small CNN over log-mel spectrograms, after BYOL-A's audio encoder (Niizumi et al., 2021).

Three conv-BN-ReLU blocks (width/2, width, 2*width channels), each halving frequency and time;
every remaining time step's (channels × frequency) column goes through an MLP; max + mean over
time give the embedding (`pool="sum"`, BYOL-A's), or both side by side (`pool="cat"`, twice the
width: a linear probe can weigh the peak and the average of a feature separately, which is
what lifted spoken-digit probes in docs/quality.md). Fast on CPU: at the defaults (64 mels, width 32) its convs cost about a
fifth of the FLOPs of BYOL-A's 64-wide encoder, and the narrow first block keeps the full-resolution
activations (the memory-bound part on CPU) small.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from selfsup.trainers.backbones import BACKBONES

POOLS = ("sum", "cat")


def _conv_block(in_ch: int, out_ch: int) -> nn.Sequential:
    """3x3 conv → BN → ReLU → 2x2 max pool: [B, in, F, T] → [B, out, F/2, T/2]."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class AudioCNN(nn.Module):
    """Log-mel [B, F, T] → conv blocks → per-frame MLP → max + mean over time → [B, out_dim]."""

    def __init__(self, n_mels: int, width: int, out_dim: int, pool: str = "sum") -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"audio_cnn_small pool={pool!r} unknown; valid: {', '.join(POOLS)}")
        self.n_mels, self.pool = n_mels, pool
        self.out_dim = out_dim * (2 if pool == "cat" else 1)
        chans = [1, max(width // 2, 1), width, 2 * width]
        self.convs = nn.Sequential(*[_conv_block(a, b) for a, b in zip(chans[:-1], chans[1:])])
        flat = chans[-1] * (n_mels // 8)
        self.mlp = nn.Sequential(
            nn.Linear(flat, out_dim),
            nn.ReLU(inplace=True),
            nn.Linear(out_dim, out_dim),
            nn.ReLU(inplace=True),
        )

    def forward(self, spec: Tensor) -> Tensor:
        """spec [B, F, T] (or [B, 1, F, T]) → [B, out_dim]."""
        if spec.ndim == 4 and spec.shape[1] == 1:
            spec = spec[:, 0]
        if spec.ndim != 3 or spec.shape[1] != self.n_mels:
            raise ValueError(
                f"audio_cnn_small expects log-mel [B, {self.n_mels}, T], got {tuple(spec.shape)}; "
                "set backbone_args.n_mels to the modality's mel count"
            )
        if spec.shape[2] < 8:
            raise ValueError(f"spectrogram has {spec.shape[2]} frames; audio_cnn_small pools time by 8, give >= 8")
        x = self.convs(spec[:, None])  # [B, C, F/8, T/8]
        x = x.permute(0, 3, 1, 2).flatten(2)  # [B, T/8, C * F/8]: frequency stays in the features
        x = self.mlp(x)  # [B, T/8, out_dim]
        if self.pool == "cat":
            return torch.cat([x.amax(1), x.mean(1)], dim=1)  # [B, 2 * mlp width]
        return x.amax(1) + x.mean(1)  # [B, out_dim]


@BACKBONES.register("audio_cnn_small")
def audio_cnn_small(n_mels: int = 64, width: int = 32, out_dim: Optional[int] = None, pool: str = "sum") -> AudioCNN:
    """BYOL-A-style CNN for log-mel [B, n_mels, T]; width = middle block channels.

    The MLP is `out_dim` wide (default 8 * width); the embedding is that wide with pool="sum"
    (max + mean over time) and twice that with pool="cat" ([max, mean]).
    """
    if n_mels < 8:
        raise ValueError(f"n_mels={n_mels} is below 8; audio_cnn_small pools frequency by 8")
    if width < 1:
        raise ValueError(f"width={width} must be >= 1")
    return AudioCNN(n_mels, width, out_dim or 8 * width, pool)
