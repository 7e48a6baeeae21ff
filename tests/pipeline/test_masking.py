"""Mask generators: exact counts, the defining shape of each mask, seeding, and token grids."""
from __future__ import annotations

import math

import numpy as np
import pytest

from selfsup.pipeline.masking import (
    MASKS,
    block_mask,
    conv_frames,
    fit_count,
    grid_from_geometry,
    make_mask,
    random_mask,
    span_mask,
    span_starts,
    tube_mask,
)

RATIOS = (0.1, 0.33, 0.4, 0.5, 0.6, 0.75, 0.9)
WAV2VEC2_BASE = [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2


def rng(seed: int) -> np.random.Generator:
    """A fresh generator for `seed`."""
    return np.random.default_rng(seed)


def masked_neighbours(mask: np.ndarray, grid: tuple[int, int]) -> float:
    """Mean number of masked 4-neighbours of a masked patch."""
    m = np.pad(mask.reshape(grid), 1).astype(int)  # [H+2, W+2]
    around = m[:-2, 1:-1] + m[2:, 1:-1] + m[1:-1, :-2] + m[1:-1, 2:]  # [H, W]
    return float(around[mask.reshape(grid)].mean())


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of True in a 1-D mask as (start, length)."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return list(zip(starts.tolist(), (ends - starts).tolist()))


# ---------------------------------------------------------------- exact counts


@pytest.mark.parametrize("grid", [(7,), (49,), (3, 5), (14, 14), (13, 11), (2, 7, 7), (1, 1)])
def test_random_mask_has_exact_count(grid: tuple[int, ...]) -> None:
    n = math.prod(grid)
    for seed in range(20):
        for ratio in RATIOS:
            mask = random_mask(rng(seed), grid, ratio)
            assert mask.dtype == np.bool_ and mask.shape == (n,)
            assert mask.sum() == round(ratio * n)


@pytest.mark.parametrize("grid", [(14, 14), (13, 11), (7, 9), (3, 3), (2, 2), (1, 6), (32, 32)])
def test_block_mask_has_exact_count(grid: tuple[int, int]) -> None:
    n = math.prod(grid)
    for seed in range(12):
        for ratio in RATIOS:
            assert block_mask(rng(seed), grid, ratio).sum() == round(ratio * n)
    # BEiT-style extra parameters, including a block cap below the minimum area
    for seed in range(12):
        mask = block_mask(rng(seed), grid, 0.4, min_num_patches=16, max_num_patches=3, min_aspect=0.5, max_aspect=3.0)
        assert mask.sum() == round(0.4 * n)


@pytest.mark.parametrize("grid", [(8, 14, 14), (3, 5, 7), (1, 4, 4), (5, 1, 3)])
def test_tube_mask_is_constant_over_time_with_count_t_times_spatial(grid: tuple[int, int, int]) -> None:
    t, h, w = grid
    for seed in range(15):
        for ratio in RATIOS:
            mask = tube_mask(rng(seed), grid, ratio).reshape(t, h * w)  # [T, H*W]
            assert (mask == mask[0]).all()
            assert mask.sum() == t * round(ratio * h * w)
    # the spatial pattern still varies between seeds
    assert len({tube_mask(rng(s), (4, 7, 7), 0.5).tobytes() for s in range(10)}) == 10


@pytest.mark.parametrize("frames,valid", [(49, None), (50, 50), (7, None), (100, 60), (100, 5), (300, 299), (30, 0)])
def test_span_mask_has_exact_count(frames: int, valid: int | None) -> None:
    for seed in range(20):
        for ratio in RATIOS:
            mask = span_mask(rng(seed), (frames,), ratio, valid)
            assert mask.shape == (frames,) and mask.sum() == round(ratio * frames)


def test_fit_count_trims_and_pads_only_as_needed() -> None:
    base = np.zeros(20, dtype=bool)
    base[:10] = True
    trimmed = fit_count(rng(0), base, 4)
    assert trimmed.sum() == 4 and not trimmed[10:].any()
    padded = fit_count(rng(0), base, 13)
    assert padded.sum() == 13 and padded[:10].all()
    assert (fit_count(rng(0), base, 10) == base).all()
    # which tokens are dropped or added is drawn from rng
    assert len({fit_count(rng(s), base, 4).tobytes() for s in range(10)}) > 1
    assert len({fit_count(rng(s), base, 13).tobytes() for s in range(10)}) > 1


# ---------------------------------------------------------------- shape of each mask


def test_block_masks_are_spatially_clustered() -> None:
    grid = (14, 14)
    for ratio in (0.25, 0.4, 0.6):
        blocky = np.mean([masked_neighbours(block_mask(rng(s), grid, ratio), grid) for s in range(40)])
        scattered = np.mean([masked_neighbours(random_mask(rng(s), grid, ratio), grid) for s in range(40)])
        # random masks give about 4*ratio (minus borders); BEiT blocks give far more
        assert blocky > scattered + 0.8, (ratio, blocky, scattered)


@pytest.mark.parametrize("aspect,shape", [(4.0, (8, 2)), (0.25, (2, 8)), (1.0, (4, 4))])
def test_block_follows_beit_area_and_aspect(aspect: float, shape: tuple[int, int]) -> None:
    # area fixed at 16 and aspect fixed: BEiT's h = round(sqrt(area*aspect)), w = round(sqrt(area/aspect))
    for seed in range(10):
        mask = block_mask(rng(seed), (32, 32), 16 / 1024, min_num_patches=16, min_aspect=aspect, max_aspect=aspect)
        rows, cols = np.nonzero(mask.reshape(32, 32))
        box = (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
        assert mask.sum() == 16 and box == shape, (seed, box)


def test_span_count_follows_fairseq_definition() -> None:
    p, length = 0.65, 10
    for valid in (137, 100, 49):
        a = p * valid / length
        counts = np.array([span_starts(rng(s), valid, p, length, 2).size for s in range(3000)])
        assert set(counts.tolist()) <= {math.floor(a), math.floor(a) + 1}
        # E[int(a + u)] = floor(a) + frac(a) = a
        assert abs(counts.mean() - a) < 0.04, (valid, counts.mean(), a)
    # min_masks lifts int(1.3 + u) in {1, 2} to 2 every time
    assert {span_starts(rng(s), 20, p, length, 2).size for s in range(200)} == {2}


def test_span_starts_are_distinct_and_uniform_over_fairseq_range() -> None:
    valid, length = 137, 10
    pooled = []
    for s in range(4000):
        starts = span_starts(rng(s), valid, 0.65, length, 2)
        assert np.unique(starts).size == starts.size
        pooled.append(starts)
    allstarts = np.concatenate(pooled)
    top = valid - length  # fairseq draws choice(valid - length): starts in [0, top)
    assert allstarts.min() == 0 and allstarts.max() == top - 1
    assert abs(allstarts.mean() - (top - 1) / 2) < 1.0
    hist = np.bincount(allstarts, minlength=top)
    expected = allstarts.size / top
    chi2 = float(((hist - expected) ** 2 / expected).sum())
    assert chi2 < (top - 1) + 6 * math.sqrt(2 * (top - 1)), chi2  # df + 6 sd


def test_span_starts_widen_a_range_too_small_for_the_spans() -> None:
    # valid - length = 2 <= num_mask: fairseq widens the range to num_mask + 1
    starts = [span_starts(rng(s), 12, 0.65, 10, 3) for s in range(200)]
    assert all(x.size == 3 and np.unique(x).size == 3 and x.max() <= 3 for x in starts)
    assert span_starts(rng(0), 0, 0.65, 10, 2).size == 0


def test_span_mask_before_trimming_is_the_union_of_full_length_spans() -> None:
    frames, valid, length = 120, 97, 10
    for seed in range(60):
        starts = span_starts(rng(seed), valid, 0.65, length, 2)
        natural = np.zeros(frames, dtype=bool)
        for s in starts:
            natural[s : s + length] = True
        # a ratio that needs no trimming reproduces the untouched spans
        mask = span_mask(rng(seed), (frames,), natural.sum() / frames, valid, 0.65, length, 2)
        assert (mask == natural).all()
        assert all(run_len >= length for _, run_len in runs(mask))
        assert natural.sum() <= starts.size * length
        # fewer frames keep a subset of the spans; more add frames around them, inside valid
        fewer = span_mask(rng(seed), (frames,), 0.2, valid, 0.65, length, 2)
        more = span_mask(rng(seed), (frames,), 0.7, valid, 0.65, length, 2)
        assert fewer.sum() == 24 and more.sum() == 84
        if natural.sum() >= 24:
            assert not (fewer & ~natural).any()
        assert (more | natural == more).all() and not more[valid:].any()


def test_padded_tail_is_masked_only_when_valid_frames_run_out() -> None:
    frames = 50
    for valid in (0, 5, 30, 49):
        for ratio in RATIOS:
            count = round(ratio * frames)
            for seed in range(10):
                for fn in (span_mask, random_mask):
                    mask = fn(rng(seed), (frames,), ratio, valid)
                    if count <= valid:
                        assert not mask[valid:].any(), (fn.__name__, valid, ratio)
                    else:
                        assert mask[:valid].all() and mask[valid:].sum() == count - valid


# ---------------------------------------------------------------- seeding


@pytest.mark.parametrize(
    "kind,grid",
    [("random", (14, 14)), ("block", (14, 14)), ("tube", (4, 7, 7)), ("span", (49,))],
)
def test_same_seed_same_mask_different_seed_different_mask(kind: str, grid: tuple[int, ...]) -> None:
    spec = {"kind": kind, "ratio": 0.5}
    for seed in range(5):
        assert (make_mask(spec, grid, rng(seed)) == make_mask(spec, grid, rng(seed))).all()
    assert len({make_mask(spec, grid, rng(s)).tobytes() for s in range(10)}) == 10


def test_masks_never_touch_global_numpy_rng() -> None:
    np.random.seed(1234)
    before = np.random.get_state()[1].copy()
    for kind, grid in (("random", (5, 5)), ("block", (8, 8)), ("tube", (2, 4, 4)), ("span", (60,))):
        make_mask({"kind": kind, "ratio": 0.6}, grid, rng(0))
    assert (np.random.get_state()[1] == before).all()
    with pytest.raises(ValueError, match="Generator"):
        make_mask({"kind": "random", "ratio": 0.5}, (4, 4), 7)  # type: ignore[arg-type]


# ---------------------------------------------------------------- registry and specs


def test_registry_holds_every_generator_and_make_mask_dispatches() -> None:
    assert MASKS.names() == ["block", "random", "span", "tube"]
    spec = {"kind": "block", "ratio": 0.4, "min_num_patches": 8, "geometry": {"patch": 16}}
    assert (make_mask(spec, (14, 14), rng(3)) == block_mask(rng(3), (14, 14), 0.4, min_num_patches=8)).all()
    span = {"kind": "span", "ratio": 0.5, "mask_length": 5}
    assert (make_mask(span, (80,), rng(2), valid=60) == span_mask(rng(2), (80,), 0.5, 60, mask_length=5)).all()


@pytest.mark.parametrize(
    "spec,grid,message",
    [
        ({"kind": "checkerboard", "ratio": 0.5}, (4, 4), r"'checkerboard'.*block, random, span, tube"),
        ({"ratio": 0.5}, (4, 4), "needs 'kind'"),
        ({"kind": "random"}, (4, 4), "'ratio'"),
        ({"kind": "random", "ratio": 0.0}, (4, 4), "ratio 0.0"),
        ({"kind": "random", "ratio": 1.0}, (4, 4), "ratio 1.0"),
        ({"kind": "random", "ratio": 1.5}, (4, 4), "ratio 1.5"),
        ({"kind": "random", "ratio": -0.2}, (4, 4), "ratio -0.2"),
        ({"kind": "random", "ratio": "0.5"}, (4, 4), "ratio '0.5'"),
        ({"kind": "random", "ratio": 0.5}, (), r"grid \(\)"),
        ({"kind": "random", "ratio": 0.5}, (4, 0), r"grid \(4, 0\)"),
        ({"kind": "random", "ratio": 0.5}, (-3,), r"grid \(-3,\)"),
        ({"kind": "block", "ratio": 0.5, "mask_length": 3}, (4, 4), "mask_length.*min_num_patches"),
        ({"kind": "block", "ratio": 0.5}, (2, 4, 4), r"2-D grid.*\(2, 4, 4\)"),
        ({"kind": "tube", "ratio": 0.5}, (4, 4), r"3-D grid.*\(4, 4\)"),
        ({"kind": "span", "ratio": 0.5}, (4, 4), r"1-D grid.*\(4, 4\)"),
        ({"kind": "span", "ratio": 0.5, "mask_length": 0}, (40,), "mask_length=0"),
        ({"kind": "block", "ratio": 0.5, "min_aspect": 0.0}, (8, 8), "min_aspect=0.0"),
    ],
)
def test_bad_specs_raise_naming_the_bad_value(spec: dict, grid: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_mask(spec, grid, rng(0))


def test_valid_outside_the_grid_raises() -> None:
    with pytest.raises(ValueError, match=r"valid=51.*\[0, 50\]"):
        span_mask(rng(0), (50,), 0.5, valid=51)
    with pytest.raises(ValueError, match="valid=-1"):
        random_mask(rng(0), (50,), 0.5, valid=-1)


# ---------------------------------------------------------------- token grids


def test_conv_frames_matches_wav2vec2_base() -> None:
    assert conv_frames(16000, WAV2VEC2_BASE) == 49
    assert conv_frames(32000, WAV2VEC2_BASE) == 99
    assert conv_frames(400, WAV2VEC2_BASE) == 1
    assert conv_frames(399, WAV2VEC2_BASE) == 0
    assert conv_frames(5, [[1, 10, 5]]) == 0
    assert conv_frames(1, [[1, 10, 2], [1, 1, 1]]) == 0  # never negative
    with pytest.raises(ValueError, match=r"\[512, 10\]"):
        conv_frames(16000, [[512, 10]])


@pytest.mark.parametrize(
    "shape,geometry,layout,grid",
    [
        ((224, 224, 3), {"patch": 16}, "image", (14, 14)),
        ((224, 112, 3), {"patch": [16, 8]}, "image", (14, 14)),
        ((32, 32, 3), {"patch": 4, "ignored": 1}, "image", (8, 8)),
        ((16, 224, 224, 3), {"tubelet": [2, 16, 16]}, "video", (8, 14, 14)),
        ((128, 1024), {"patch": [16, 16]}, "spec", (8, 64)),
        ((80, 30), {"patch": 10}, "spec", (8, 3)),
        ((16000,), {"conv_layers": WAV2VEC2_BASE}, "wave", (49,)),
    ],
)
def test_grid_from_geometry(shape: tuple[int, ...], geometry: dict, layout: str, grid: tuple[int, ...]) -> None:
    assert grid_from_geometry(shape, geometry, layout) == grid


@pytest.mark.parametrize(
    "shape,geometry,layout,message",
    [
        ((30, 30, 3), {"patch": 4}, "image", r"image 30x30 is not divisible by patch 4x4: choose"),
        ((224, 200, 3), {"patch": [16, 16]}, "image", r"image 224x200 .*patch 16x16.*\(224, 200, 3\)"),
        ((15, 224, 224, 3), {"tubelet": [2, 16, 16]}, "video", r"video 15x224x224 .*tubelet 2x16x16"),
        ((128, 1000), {"patch": [16, 16]}, "spec", r"spectrogram 128x1000 .*patch 16x16"),
        ((300,), {"conv_layers": WAV2VEC2_BASE}, "wave", r"wave of 300 samples"),
        ((224, 224, 3), {"tubelet": [2, 16, 16]}, "image", r"patch=None.*'tubelet'"),
        ((224, 224, 3), {"patch": [16, 16, 16]}, "image", r"patch=\[16, 16, 16\]"),
        ((16, 224, 224, 3), {"tubelet": [2, 0, 16]}, "video", r"tubelet=\[2, 0, 16\]"),
        ((224, 224), {"patch": 16}, "image", r"image array shape \(224, 224\) must have 3"),
        ((224, 224, 3), {"patch": 16}, "voxels", r"'voxels'.*image, spec, video, wave"),
    ],
)
def test_grid_from_geometry_mismatch_names_both_sides(
    shape: tuple[int, ...], geometry: dict, layout: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        grid_from_geometry(shape, geometry, layout)
