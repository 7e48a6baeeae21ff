"""ViT tokenizers per modality: image patches, video tubelets, log-mel spectrogram patches.

Each maps its input to tokens [B, N, D] flattened in row-major grid order ((t,) h, w) — for
spectrograms (f, t) — the order the data pipeline's masks use, and `patchify` gives the raw
values of the same patches [B, N, patch_dim] in the same order (MAE's reconstruction targets).
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Sequence, Union

import torch
from torch import nn

Size = Union[int, Sequence[int]]


def pair(value: Size, label: str) -> tuple[int, int]:
    """(h, w) from an int or a 2-sequence."""
    if isinstance(value, int):
        return value, value
    values = tuple(int(v) for v in value)
    if len(values) != 2:
        raise ValueError(f"{label}={list(value)}; give one int or two ints")
    return values[0], values[1]


def grid_of(sizes: Sequence[int], patch: Sequence[int], labels: Sequence[str]) -> tuple[int, ...]:
    """Tokens along each axis; raises when a patch size does not divide its input size."""
    for size, p, label in zip(sizes, patch, labels):
        if p < 1 or size < 1 or size % p:
            raise ValueError(
                f"{label} {size} is not a positive multiple of its patch size {p}; "
                f"pick sizes that the patch divides"
            )
    return tuple(s // p for s, p in zip(sizes, patch))


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Fixed sine-cosine embedding [P, dim] of integer positions [P]."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # [dim/2]
    angles = positions.to(torch.float64)[:, None] * omega[None]  # [P, dim/2]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_pos_embed(dim: int, grid: Sequence[int]) -> torch.Tensor:
    """Fixed N-D sine-cosine position embedding [prod(grid), dim], row-major over the grid.

    The channels are split between the axes (each part even; the first axis takes the rest).
    """
    k = len(grid)
    part = (dim // (2 * k)) * 2
    first = dim - part * (k - 1)
    if dim % 2 or part < 2:
        raise ValueError(f"sin-cos position embedding needs an even dim >= {2 * k} for a {k}-D grid; got {dim}")
    coords = torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij")  # k × [*grid]
    parts = [sincos_1d(first if i == 0 else part, c.reshape(-1)) for i, c in enumerate(coords)]
    return torch.cat(parts, dim=1)  # [N, dim]


def init_as_linear(conv: Union[nn.Conv2d, nn.Conv3d]) -> None:
    """Xavier-uniform init of a patch-embedding conv viewed as a Linear (as MAE does)."""
    w = conv.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class PatchTokenizer(nn.Module):
    """Images [B, C, H, W] → patch tokens [B, (H/p)(W/p), D]."""

    def __init__(self, dim: int, in_channels: int = 3, img_size: Size = 224, patch_size: int = 16) -> None:
        super().__init__()
        h, w = pair(img_size, "img_size")
        self.in_shape = (in_channels, h, w)
        self.patch = int(patch_size)
        self.grid = grid_of((h, w), (self.patch, self.patch), ("image height", "image width"))
        self.patch_dim = self.patch * self.patch * in_channels
        self.proj = nn.Conv2d(in_channels, dim, self.patch, stride=self.patch)
        init_as_linear(self.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [B, N, D]."""
        check_shape(x, self.in_shape, "image tokenizer", "[B, C, H, W]")
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, D, h, w] → [B, h*w, D]

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels per patch [B, N, p*p*C], each patch flattened (p, p, C)."""
        check_shape(x, self.in_shape, "image tokenizer", "[B, C, H, W]")
        b, c = x.shape[:2]
        (h, w), p = self.grid, self.patch
        x = x.reshape(b, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1)  # [B, h, w, p, p, C]
        return x.reshape(b, h * w, self.patch_dim)

    def geometry(self) -> dict[str, Any]:
        """What a mask generator needs to draw masks on this grid."""
        return {"patch": self.patch}


class TubeletTokenizer(nn.Module):
    """Videos [B, C, T, H, W] → tubelet tokens [B, (T/t)(H/p)(W/p), D] (a Conv3d)."""

    def __init__(
        self,
        dim: int,
        in_channels: int = 3,
        frames: int = 16,
        img_size: Size = 224,
        tubelet: Sequence[int] = (2, 16, 16),
    ) -> None:
        super().__init__()
        h, w = pair(img_size, "img_size")
        self.tubelet = tuple(int(v) for v in tubelet)
        if len(self.tubelet) != 3:
            raise ValueError(f"tubelet={list(tubelet)}; give [t, p, p] (frames, height, width per token)")
        self.in_shape = (in_channels, frames, h, w)
        self.grid = grid_of((frames, h, w), self.tubelet, ("video frames", "video height", "video width"))
        self.patch_dim = math.prod(self.tubelet) * in_channels
        self.proj = nn.Conv3d(in_channels, dim, self.tubelet, stride=self.tubelet)
        init_as_linear(self.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [B, N, D]."""
        check_shape(x, self.in_shape, "video tokenizer", "[B, C, T, H, W]")
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, D, t, h, w] → [B, t*h*w, D]

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels per tubelet [B, N, t*p*p*C], each tubelet flattened (t, p, p, C)."""
        check_shape(x, self.in_shape, "video tokenizer", "[B, C, T, H, W]")
        b, c = x.shape[:2]
        (gt, gh, gw), (pt, ph, pw) = self.grid, self.tubelet
        x = x.reshape(b, c, gt, pt, gh, ph, gw, pw).permute(0, 2, 4, 6, 3, 5, 7, 1)  # [B, gt, gh, gw, pt, ph, pw, C]
        return x.reshape(b, gt * gh * gw, self.patch_dim)

    def geometry(self) -> dict[str, Any]:
        """What a mask generator needs to draw masks on this grid."""
        return {"tubelet": list(self.tubelet)}


class SpectrogramTokenizer(nn.Module):
    """Log-mel spectrograms [B, F, T] → patch tokens [B, (F/pf)(T/pt), D], row-major over (f, t)."""

    def __init__(self, dim: int, n_mels: int = 128, frames: int = 1024, patch_size: Size = (16, 16)) -> None:
        super().__init__()
        self.patch = pair(patch_size, "patch_size")
        self.in_shape = (n_mels, frames)
        self.grid = grid_of((n_mels, frames), self.patch, ("spectrogram mel bins", "spectrogram frames"))
        self.patch_dim = self.patch[0] * self.patch[1]
        self.proj = nn.Conv2d(1, dim, self.patch, stride=self.patch)
        init_as_linear(self.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [B, N, D]."""
        check_shape(x, self.in_shape, "spectrogram tokenizer", "[B, F, T]")
        return self.proj(x.unsqueeze(1)).flatten(2).transpose(1, 2)  # [B, D, f, t] → [B, f*t, D]

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """Values per patch [B, N, pf*pt], each patch flattened (pf, pt)."""
        check_shape(x, self.in_shape, "spectrogram tokenizer", "[B, F, T]")
        b = x.shape[0]
        (gf, gt), (pf, pt) = self.grid, self.patch
        x = x.reshape(b, gf, pf, gt, pt).permute(0, 1, 3, 2, 4)  # [B, gf, gt, pf, pt]
        return x.reshape(b, gf * gt, self.patch_dim)

    def geometry(self) -> dict[str, Any]:
        """What a mask generator needs to draw masks on this grid."""
        return {"patch": list(self.patch)}


def check_shape(x: torch.Tensor, expected: tuple[int, ...], who: str, layout: str) -> None:
    """Raise naming both shapes when `x` [B, *expected] does not match the tokenizer's size."""
    if tuple(x.shape[1:]) != expected:
        raise ValueError(
            f"{who} was built for inputs {layout} = [B, {', '.join(map(str, expected))}] "
            f"but got {tuple(x.shape)}; build the backbone with the sizes the data pipeline produces"
        )


Tokenizer = Union[PatchTokenizer, TubeletTokenizer, SpectrogramTokenizer]
TOKENIZERS: dict[str, Callable[..., Tokenizer]] = {
    "image": PatchTokenizer,
    "video": TubeletTokenizer,
    "audio": SpectrogramTokenizer,
}


def make_tokenizer(modality: str, dim: int, **args: Any) -> Tokenizer:
    """The tokenizer for `modality` ("image" | "video" | "audio") with its size arguments."""
    if modality not in TOKENIZERS:
        raise ValueError(f"no ViT tokenizer for modality {modality!r}; valid: {', '.join(sorted(TOKENIZERS))}")
    takes = [p for p in inspect.signature(TOKENIZERS[modality]).parameters if p != "dim"]
    unknown = sorted(set(args) - set(takes))
    if unknown:
        raise ValueError(f"ViT {modality} tokenizer got unknown arguments {unknown}; it takes {takes}")
    return TOKENIZERS[modality](dim, **args)
