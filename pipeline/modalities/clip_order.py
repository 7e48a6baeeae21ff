"""Clip-order tuples for video (VCOP, Xu et al. CVPR 2019): n sub-clips in time order, shuffled.

The video modality's `output: order` samples n sub-clips of t frames each, sub-clip k starting
k·(t·stride + gap) frames after the first, so the tuple spans (n-1)·(t·stride + gap) + (t-1)·stride + 1
frames from a random start. One crop, flip and jitter cover every sub-clip (the only cue left is
order); then one permutation drawn from the sample's rng shuffles them. The label is the index of
that permutation in `permutations(n)` (all n! orders, lexicographic, as VCOP classifies them):

    clips[j] = ordered[perm[j]]      perm = permutations(n)[order]
    ordered  = clips[argsort(perm)]  (un-shuffling gives sub-clips in increasing time)

VCOP's all-orders classification is used rather than shuffle-and-learn's binary in/out-of-order
label: with n = 3 it has 6 classes, so the head must tell each sub-clip's place (which needs the
direction of motion inside a sub-clip to tell an order from its reverse), not just spot a shuffle.
"""
from __future__ import annotations

import itertools
import math
from functools import lru_cache

import numpy as np

MAX_ORDER_CLIPS = 5  # 5! = 120 classes; VCOP found 3 or 4 clips best


@lru_cache(maxsize=None)
def permutations(n: int) -> tuple[tuple[int, ...], ...]:
    """All n! orders of range(n), lexicographic; the order label indexes this tuple."""
    return tuple(itertools.permutations(range(n)))


def check_order_args(clips: int, clip_frames: int, gap: int) -> None:
    """ValueError naming the bad `order_*` modality argument and its valid range."""
    if not 2 <= clips <= MAX_ORDER_CLIPS:
        raise ValueError(f"video order_clips={clips}; use 2..{MAX_ORDER_CLIPS} sub-clips "
                         f"({MAX_ORDER_CLIPS}! = {math.factorial(MAX_ORDER_CLIPS)} order classes at most)")
    if clip_frames < 1:
        raise ValueError(f"video order_clip_frames={clip_frames}; each sub-clip needs at least 1 frame")
    if gap < 0:
        raise ValueError(f"video order_gap={gap}; the frames skipped between sub-clips must be >= 0")


def tuple_indices(total: int, clips: int, clip_frames: int, stride: int, gap: int,
                  rng: np.random.Generator) -> list[int]:
    """Frame indices of the n sub-clips in time order, flattened [n·t], non-decreasing, clamped to the
    last frame (a video shorter than the span repeats it); the start is uniform among those that fit."""
    hop = clip_frames * stride + gap  # first frame of sub-clip k+1 minus that of sub-clip k
    span = (clips - 1) * hop + (clip_frames - 1) * stride + 1
    start = int(rng.integers(0, max(0, total - span) + 1))
    return [min(start + k * hop + j * stride, total - 1) for k in range(clips) for j in range(clip_frames)]


def shuffle_tuple(frames: np.ndarray, clips: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """{"clips": uint8 [n, t, H, W, C] shuffled, "order": int64 [] permutation index} from frames
    [n·t, H, W, C] in time order; the permutation is uniform over the n! orders."""
    t = frames.shape[0] // clips
    ordered = frames.reshape(clips, t, *frames.shape[1:])  # [n, t, H, W, C]
    order = int(rng.integers(0, math.factorial(clips)))
    perm = permutations(clips)[order]
    return {"clips": np.ascontiguousarray(ordered[list(perm)]), "order": np.array(order, np.int64)}


def blank_tuple(clips: int, clip_frames: int, size: int, channels: int) -> dict[str, np.ndarray]:
    """Zero arrays shaped like `shuffle_tuple`'s."""
    return {"clips": np.zeros((clips, clip_frames, size, size, channels), np.uint8),
            "order": np.zeros((), np.int64)}
