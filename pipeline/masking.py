"""Mask generators for masked-prediction objectives: pure, seeded, vectorised numpy.

Every generator returns a flat boolean mask over the encoder's token grid, row-major
(True = masked/hidden), with exactly `round(ratio * N)` True values, N = prod(grid), so
masked tokens can be dropped from a batch by a gather of fixed size. Tube masks are the one
exception: their count is `T * round(ratio * H * W)`, because being constant over time is
what defines them. The only source of randomness is the `rng` argument; the same rng state
gives the same mask.

`valid` is the number of leading tokens (in flattened order) that hold real signal: all of
them unless audio was padded. Random and span masks draw inside the valid region first and
spill into the padded tail only when the valid region cannot hold the required count (the
objective excludes padded tokens from its loss). Block and tube grids are spatial, so they
treat every token as valid and ignore `valid` beyond checking it.
"""
from __future__ import annotations

import inspect
import math
from numbers import Integral, Real
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from selfsup.pipeline.registry import Registry

MaskFn = Callable[..., np.ndarray]
MASKS: Registry[MaskFn] = Registry("mask")

_COMMON_ARGS = ("rng", "grid", "ratio", "valid")


# ---------------------------------------------------------------- checks and exact counts


def _checked_grid(grid: Sequence[int]) -> tuple[int, ...]:
    """`grid` as a tuple of positive ints; raises on an empty or non-positive grid."""
    dims = tuple(grid)
    if not dims or not all(isinstance(d, Integral) and not isinstance(d, bool) and d > 0 for d in dims):
        raise ValueError(f"mask grid {dims!r} must be a non-empty tuple of positive ints: check the token geometry")
    return tuple(int(d) for d in dims)


def _checked_ratio(ratio: float) -> float:
    """`ratio` as a float strictly between 0 and 1; raises otherwise."""
    if isinstance(ratio, bool) or not isinstance(ratio, Real) or not 0.0 < float(ratio) < 1.0:
        raise ValueError(f"mask ratio {ratio!r} must be a number strictly between 0 and 1, e.g. 0.75")
    return float(ratio)


def _checked_valid(valid: int | None, n: int) -> int:
    """The number of valid leading tokens (all `n` when None); raises outside [0, n]."""
    if valid is None:
        return n
    if isinstance(valid, bool) or not isinstance(valid, Integral) or not 0 <= valid <= n:
        raise ValueError(f"valid={valid!r} must be an int in [0, {n}] (the number of tokens holding real signal)")
    return int(valid)


def _checked_rng(rng: object) -> np.random.Generator:
    """`rng` itself; raises unless it is a numpy Generator (never the global RNG)."""
    if not isinstance(rng, np.random.Generator):
        raise ValueError(
            f"rng must be a numpy.random.Generator (e.g. pipeline.seeding.sample_rng), got {type(rng).__name__}"
        )
    return rng


def mask_count(grid: Sequence[int], ratio: float) -> int:
    """How many tokens a mask of `ratio` hides on `grid`: round(ratio * prod(grid))."""
    return int(round(_checked_ratio(ratio) * math.prod(_checked_grid(grid))))


def fit_count(rng: np.random.Generator, mask: np.ndarray, count: int, valid: int | None = None) -> np.ndarray:
    """A copy of flat `mask` with exactly `count` True: unmask at random, or mask at random.

    Added tokens come from the first `valid` tokens first, and from the tail only once the
    valid region is fully masked.
    """
    out = np.array(mask, dtype=bool).ravel()  # [N]
    n = out.size
    if not 0 <= count <= n:
        raise ValueError(f"mask count {count} must be in [0, {n}] for a grid of {n} tokens")
    limit = _checked_valid(valid, n)
    have = int(out.sum())
    if have > count:
        masked = np.flatnonzero(out)
        out[rng.choice(masked, have - count, replace=False)] = False
    elif have < count:
        free = np.flatnonzero(~out)
        # valid tokens sort before tail tokens; the noise orders each group at random
        order = np.argsort((free >= limit) + rng.random(free.size), kind="stable")
        out[free[order[: count - have]]] = True
    return out


# ---------------------------------------------------------------- random (MAE)


@MASKS.register("random")
def random_mask(rng: np.random.Generator, grid: Sequence[int], ratio: float, valid: int | None = None) -> np.ndarray:
    """MAE's random patch mask: the `round(ratio*N)` tokens with the smallest noise are hidden."""
    dims, count = _checked_grid(grid), mask_count(grid, ratio)
    n = math.prod(dims)
    limit = _checked_valid(valid, n)
    noise = _checked_rng(rng).random(n) + (np.arange(n) >= limit)  # [N]; padded tokens last
    mask = np.zeros(n, dtype=bool)
    mask[np.argsort(noise, kind="stable")[:count]] = True
    return mask


# ---------------------------------------------------------------- block (BEiT / SimMIM)


def _place_block(
    rng: np.random.Generator, mask: np.ndarray, budget: int, min_area: float, log_aspect: tuple[float, float]
) -> int:
    """One BEiT block attempt cycle (up to 10 tries) on 2-D `mask`; returns how many patches it added."""
    height, width = mask.shape
    for _ in range(10):
        area = min_area + (budget - min_area) * rng.random()  # as random.uniform, also when budget < min_area
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if w < width and h < height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            window = mask[top : top + h, left : left + w]  # view: [h, w]
            new = h * w - int(window.sum())
            if 0 < new <= budget:
                window[...] = True
                return new
    return 0


@MASKS.register("block")
def block_mask(
    rng: np.random.Generator,
    grid: Sequence[int],
    ratio: float,
    valid: int | None = None,
    min_num_patches: int = 4,
    max_num_patches: int | None = None,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
) -> np.ndarray:
    """BEiT's blockwise mask on a 2-D grid (H, W), brought to exactly `round(ratio*N)` tokens.

    Blocks of area uniform in [min_num_patches, max_num_patches] and log-uniform aspect in
    [min_aspect, max_aspect or 1/min_aspect] are placed at random, each adding only new
    patches, until the target count or until no block fits; the rest is filled at random.
    """
    dims = _checked_grid(grid)
    if len(dims) != 2:
        raise ValueError(f"block masks need a 2-D grid (H, W), got {dims}: use 'tube' for video, 'span' for frames")
    count = mask_count(dims, ratio)
    _checked_valid(valid, math.prod(dims))
    _checked_rng(rng)
    if min_num_patches < 1 or min_aspect <= 0 or (max_aspect is not None and max_aspect < min_aspect):
        raise ValueError(
            f"block mask needs min_num_patches >= 1 and 0 < min_aspect <= max_aspect, got "
            f"min_num_patches={min_num_patches}, min_aspect={min_aspect}, max_aspect={max_aspect}"
        )
    largest = count if max_num_patches is None else max_num_patches
    log_aspect = (math.log(min_aspect), math.log(max_aspect or 1.0 / min_aspect))
    mask = np.zeros(dims, dtype=bool)  # [H, W]
    done = 0
    while done < count:
        added = _place_block(rng, mask, min(count - done, largest), min_num_patches, log_aspect)
        if added == 0:
            break
        done += added
    return fit_count(rng, mask.ravel(), count)


# ---------------------------------------------------------------- tube (VideoMAE)


@MASKS.register("tube")
def tube_mask(rng: np.random.Generator, grid: Sequence[int], ratio: float, valid: int | None = None) -> np.ndarray:
    """VideoMAE's tube mask on a 3-D grid (T, H, W): one spatial random mask repeated over time.

    The count is T * round(ratio * H * W), which can differ from round(ratio * T*H*W).
    """
    dims = _checked_grid(grid)
    if len(dims) != 3:
        raise ValueError(f"tube masks need a 3-D grid (T, H, W), got {dims}: use 'random' or 'block' for images")
    t, h, w = dims
    _checked_valid(valid, t * h * w)
    spatial = random_mask(rng, (h, w), ratio)  # [H*W]
    return np.tile(spatial, t)  # [T*H*W], row-major over (T, H, W)


# ---------------------------------------------------------------- span (wav2vec 2.0)


def span_starts(rng: np.random.Generator, valid: int, mask_prob: float, mask_length: int, min_masks: int) -> np.ndarray:
    """Span starts as fairseq's `compute_mask_indices` draws them (static lengths, overlap allowed).

    num_mask = max(min_masks, int(mask_prob * valid / mask_length + u)), u ~ U[0, 1); starts
    are distinct, uniform over [0, valid - mask_length) (fairseq's `choice(sz - min_len)`),
    the range widened to num_mask + 1 when it is too small. Empty when valid is 0.
    """
    if mask_length < 1 or min_masks < 0 or not 0.0 <= mask_prob <= 1.0 or valid < 0:
        raise ValueError(
            f"span mask needs mask_length >= 1, min_masks >= 0, 0 <= mask_prob <= 1 and valid >= 0, got "
            f"mask_length={mask_length}, min_masks={min_masks}, mask_prob={mask_prob}, valid={valid}"
        )
    if valid == 0:
        return np.zeros(0, dtype=np.int64)
    num_mask = max(int(min_masks), int(mask_prob * valid / float(mask_length) + rng.random()))
    population = valid - mask_length
    if population <= num_mask:
        population = num_mask + 1
    return rng.choice(population, num_mask, replace=False).astype(np.int64)  # [num_mask]


@MASKS.register("span")
def span_mask(
    rng: np.random.Generator,
    grid: Sequence[int],
    ratio: float,
    valid: int | None = None,
    mask_prob: float = 0.65,
    mask_length: int = 10,
    min_masks: int = 2,
) -> np.ndarray:
    """wav2vec 2.0's span mask on a 1-D grid (frames,), brought to exactly `round(ratio*N)` frames.

    Spans of `mask_length` frames start at `span_starts` inside the first `valid` frames and
    merge where they overlap; the count is then trimmed at random, or padded at random from
    the valid frames first and from the padded tail only once those are all masked.
    """
    dims = _checked_grid(grid)
    if len(dims) != 1:
        raise ValueError(f"span masks need a 1-D grid (frames,), got {dims}: use 'random' or 'block' for patches")
    count = mask_count(dims, ratio)
    limit = _checked_valid(valid, dims[0])
    starts = span_starts(_checked_rng(rng), limit, mask_prob, mask_length, min_masks)
    frames = (starts[:, None] + np.arange(mask_length)).ravel()  # [num_mask * mask_length]
    mask = np.zeros(dims[0], dtype=bool)
    mask[frames[frames < limit]] = True
    return fit_count(rng, mask, count, limit)


# ---------------------------------------------------------------- dispatch


def make_mask(
    spec: Mapping[str, Any], grid: tuple[int, ...], rng: np.random.Generator, valid: int | None = None
) -> np.ndarray:
    """The mask `spec` describes, e.g. {"kind": "block", "ratio": 0.4, "min_num_patches": 16}.

    A `geometry` key is ignored here (it decides `grid` elsewhere); other keys are passed to
    the generator and must be among its parameters.
    """
    params = {k: v for k, v in spec.items() if k not in ("kind", "ratio", "geometry")}
    if "kind" not in spec or "ratio" not in spec:
        raise ValueError(f"mask spec {dict(spec)!r} needs 'kind' (one of {', '.join(MASKS.names())}) and 'ratio'")
    fn = MASKS.get(spec["kind"])
    allowed = [p for p in inspect.signature(fn).parameters if p not in _COMMON_ARGS]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(
            f"mask {spec['kind']!r} has no parameter(s) {', '.join(unknown)}; valid: {', '.join(allowed) or '(none)'}"
        )
    return fn(_checked_rng(rng), _checked_grid(grid), _checked_ratio(spec["ratio"]), valid, **params)


# ---------------------------------------------------------------- token grids


def conv_frames(num_samples: int, conv_layers: Sequence[Sequence[int]]) -> int:
    """Output frames of a wav2vec2-style 1-D conv stack [[dim, kernel, stride], ...] on `num_samples`."""
    length = int(num_samples)
    for layer in conv_layers:
        if len(layer) != 3 or any(int(v) < 1 for v in layer):
            raise ValueError(f"conv layer {list(layer)!r} must be [dim, kernel, stride] of positive ints")
        _, kernel, stride = (int(v) for v in layer)
        length = (length - kernel) // stride + 1 if length >= kernel else 0
    return length


def _sizes(value: object, rank: int, name: str) -> tuple[int, ...]:
    """A geometry entry as `rank` positive ints (an int repeats); raises naming `name`."""
    sizes = (value,) * rank if isinstance(value, Integral) else tuple(value) if isinstance(value, Sequence) else ()
    if len(sizes) != rank or not all(isinstance(s, Integral) and not isinstance(s, bool) and int(s) > 0 for s in sizes):
        raise ValueError(f"geometry {name}={value!r} must be {rank} positive int(s)")
    return tuple(int(s) for s in sizes)


def _divide(what: str, dims: tuple[int, ...], key: str, sizes: tuple[int, ...]) -> tuple[int, ...]:
    """dims // sizes, raising with both sides named when any does not divide evenly."""
    if any(d % s for d, s in zip(dims, sizes)):
        shape, patch = "x".join(map(str, dims)), "x".join(map(str, sizes))
        raise ValueError(
            f"{what} {shape} is not divisible by {key} {patch}: choose a size that is a multiple of the {key}"
        )
    return tuple(d // s for d, s in zip(dims, sizes))


def _image_grid(shape: tuple[int, ...], geometry: Mapping[str, Any]) -> tuple[int, ...]:
    """(H//ph, W//pw) for an image (H, W, C) and {"patch": p or [ph, pw]}."""
    return _divide("image", shape[:2], "patch", _sizes(geometry.get("patch"), 2, "patch"))


def _video_grid(shape: tuple[int, ...], geometry: Mapping[str, Any]) -> tuple[int, ...]:
    """(T//t, H//ph, W//pw) for a video (T, H, W, C) and {"tubelet": [t, ph, pw]}."""
    return _divide("video", shape[:3], "tubelet", _sizes(geometry.get("tubelet"), 3, "tubelet"))


def _spec_grid(shape: tuple[int, ...], geometry: Mapping[str, Any]) -> tuple[int, ...]:
    """(F//pf, T//pt) for a spectrogram (F, T) and {"patch": p or [pf, pt]}."""
    return _divide("spectrogram", shape, "patch", _sizes(geometry.get("patch"), 2, "patch"))


def _wave_grid(shape: tuple[int, ...], geometry: Mapping[str, Any]) -> tuple[int, ...]:
    """(frames,) for a waveform (S,) and {"conv_layers": [[dim, kernel, stride], ...]}."""
    layers = geometry.get("conv_layers")
    if not isinstance(layers, Sequence) or not layers:
        raise ValueError(f"geometry conv_layers={layers!r} must be a non-empty list of [dim, kernel, stride]")
    frames = conv_frames(shape[0], layers)
    if frames < 1:
        raise ValueError(
            f"wave of {shape[0]} samples gives no frames from conv_layers {list(layers)!r}: use longer clips"
        )
    return (frames,)


_LAYOUTS: dict[str, tuple[int, Callable[[tuple[int, ...], Mapping[str, Any]], tuple[int, ...]]]] = {
    "image": (3, _image_grid),  # (H, W, C)
    "video": (4, _video_grid),  # (T, H, W, C)
    "spec": (2, _spec_grid),  # (F, T)
    "wave": (1, _wave_grid),  # (S,)
}


def grid_from_geometry(array_shape: tuple[int, ...], geometry: Mapping[str, Any], layout: str) -> tuple[int, ...]:
    """The encoder's token grid for one sample's array of `array_shape` under `geometry`."""
    if layout not in _LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(sorted(_LAYOUTS))}")
    rank, grid_fn = _LAYOUTS[layout]
    shape = tuple(int(d) for d in array_shape)
    if len(shape) != rank or min(shape, default=0) < 1:
        raise ValueError(f"{layout} array shape {shape} must have {rank} positive dimensions")
    try:
        return grid_fn(shape, geometry)
    except ValueError as err:
        raise ValueError(f"{err} (array shape {shape}, geometry {dict(geometry)!r})") from None
