"""Micro-batches (numpy, from BatchFeed) → model inputs on the device.

uint8 media travel as uint8 and become float on the device: images [B, H, W, C] →
[B, C, H, W], video [B, T, H, W, C] → [B, C, T, H, W], clip tuples (video `output: order`)
[B, n, t, H, W, C] → [B, n, C, t, H, W], multi-crop `local` images [B, K, S, S, C] → [B, K, C, S, S]
(told from video by name), scaled to [0, 1] then normalized per channel. Audio arrives as float
already (log-mel or waveform). Masks stay bool.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

MEDIA_FIELDS = ("view1", "view2", "image", "video", "spec", "wave", "clips", "local")
CROP_FIELDS = ("local",)  # [B, K, ...] stacks of K images per sample, not video
INDEX_FIELDS = ("length", "label", "order", "sample_id")
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
GRAY = ((0.5,), (0.25,))


def default_norm(channels: int) -> tuple[Sequence[float], Sequence[float]]:
    """ImageNet statistics for RGB, a neutral (0.5, 0.25) for one channel."""
    return IMAGENET if channels == 3 else (GRAY[0] * channels, GRAY[1] * channels)


def to_channels_first(x: torch.Tensor) -> torch.Tensor:
    """[B, H, W, C] → [B, C, H, W]; [B, T, H, W, C] → [B, C, T, H, W]; [B, n, t, H, W, C] → [B, n, C, t, H, W]."""
    if x.ndim == 4:
        return x.permute(0, 3, 1, 2)
    if x.ndim == 5:
        return x.permute(0, 4, 1, 2, 3)
    if x.ndim == 6:
        return x.permute(0, 1, 5, 2, 3, 4)
    raise ValueError(f"uint8 media must be [B, H, W, C], [B, T, H, W, C] or [B, n, t, H, W, C], "
                     f"got shape {tuple(x.shape)}")


def channel_norm(channels: int, mean: Optional[Sequence[float]],
                 std: Optional[Sequence[float]]) -> tuple[Sequence[float], Sequence[float]]:
    """The (mean, std) applied to media of `channels` channels: data.mean/std, else `default_norm`."""
    if mean is None or std is None:
        mean, std = default_norm(channels)
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"data.mean/std have {len(mean)}/{len(std)} values but the media have {channels} channels")
    return mean, std


def normalize_uint8(x: torch.Tensor, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]) -> torch.Tensor:
    """uint8 channels-last media → float channels-first, scaled and normalized."""
    x = to_channels_first(x).float().div_(255.0)
    lead = 2 if x.ndim == 6 else 1  # a clip tuple keeps its clip axis before the channels
    c = x.shape[lead]
    mean, std = channel_norm(c, mean, std)
    shape = (1,) * lead + (c,) + (1,) * (x.ndim - lead - 1)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(shape)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(shape)
    return (x - m) / s


def normalize_crops(x: torch.Tensor, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]) -> torch.Tensor:
    """uint8 crops [B, K, S, S, C] → float [B, K, C, S, S], normalized as images are."""
    if x.ndim != 5:
        raise ValueError(f"uint8 crops must be [B, K, S, S, C], got shape {tuple(x.shape)}")
    b, k = x.shape[:2]
    flat = normalize_uint8(x.reshape(b * k, *x.shape[2:]), mean, std)  # [B*K, C, S, S]
    return flat.reshape(b, k, *flat.shape[1:])


def eval_sample(modality: str, modality_args: Mapping[str, Any]) -> Mapping[str, Any]:
    """A blank eval-mode sample of the modality: the fields, shapes and dtypes evaluation feeds the encoder."""
    from selfsup.pipeline.modalities import make_modality

    return make_modality(modality, **dict(modality_args)).blank(train=False)


def applied_norm(sample: Mapping[str, Any], mean: Optional[Sequence[float]],
                 std: Optional[Sequence[float]]) -> tuple[Optional[list[float]], Optional[list[float]]]:
    """The per-channel (mean, std) `to_device` applies to the sample's uint8 media; (None, None) when it
    has none (audio arrives as float and is not normalized)."""
    for name in MEDIA_FIELDS:
        value = sample.get(name)
        if isinstance(value, np.ndarray) and value.dtype == np.uint8:
            m, s = channel_norm(value.shape[-1], mean, std)
            return [float(v) for v in m], [float(v) for v in s]
    return None, None


def tensor_fields(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The arrays an objective reads (media, masks, lengths, labels, valid); bookkeeping fields
    (keys, shards) stay behind."""
    return {name: value for name, value in batch.items()
            if isinstance(value, np.ndarray) and value.dtype.kind not in "US"
            and (name in MEDIA_FIELDS or name in INDEX_FIELDS or name in ("mask", "valid"))}


def model_input(name: str, t: torch.Tensor, mean: Optional[Sequence[float]] = None,
                std: Optional[Sequence[float]] = None) -> torch.Tensor:
    """A field already on its device as the objective takes it: uint8 media normalized to float."""
    if name in CROP_FIELDS and t.dtype == torch.uint8:
        return normalize_crops(t, mean, std)
    if name in MEDIA_FIELDS:
        return normalize_uint8(t, mean, std) if t.dtype == torch.uint8 else t.float()
    return t


def to_device(batch: Mapping[str, Any], device: torch.device, mean: Optional[Sequence[float]] = None,
              std: Optional[Sequence[float]] = None) -> dict[str, torch.Tensor]:
    """The tensors an objective reads, on `device` (copied from pageable memory: see trainers/staging.py
    for pinned buffers and copies ahead of the step)."""
    return {name: model_input(name, torch.from_numpy(value).to(device, non_blocking=True), mean, std)
            for name, value in tensor_fields(batch).items()}
