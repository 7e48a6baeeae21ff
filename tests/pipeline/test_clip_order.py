"""Video `output: order` (VCOP clip tuples): the seeded permutation label, time order under un-shuffling, blanks."""
from __future__ import annotations

import numpy as np
import pytest

from selfsup.pipeline.modalities import make_modality
from selfsup.pipeline.modalities.clip_order import permutations, shuffle_tuple, tuple_indices
from selfsup.pipeline.modalities.video import VideoInfo, encode_clip_mp4

ORDER = {"output": "order", "order_clips": 3, "order_clip_frames": 4, "order_gap": 1, "stride": 1,
         "size": 16, "channels": 1, "frames": 8}


@pytest.fixture(scope="module")
def counting() -> VideoInfo:
    """A 16-frame MP4 whose frame i is flat gray 10·i, probed once (frames decode per sample)."""
    frames = np.stack([np.full((32, 32, 3), 10 * i, np.uint8) for i in range(16)])
    return make_modality("video", **ORDER).decode({"mp4": encode_clip_mp4(frames, fps=10)})


def frame_numbers(clips: np.ndarray) -> np.ndarray:
    """int [n, t]: which frame of `counting` each frame of clips [n, t, H, W, C] shows (value 10·i)."""
    return np.rint(clips.reshape(*clips.shape[:2], -1).mean(axis=2) / 10).astype(int)


def test_permutations_are_all_orders_lexicographic() -> None:
    assert permutations(3) == ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
    assert len(permutations(4)) == 24 and len(set(permutations(4))) == 24


def test_order_label_is_uniform_over_seeds_and_indexes_the_applied_permutation() -> None:
    ordered = np.arange(3 * 2 * 4, dtype=np.uint8).reshape(6, 2, 2, 1)  # [n·t, H, W, C], t = 2
    counts = np.zeros(6, int)
    for seed in range(3000):
        out = shuffle_tuple(ordered, 3, np.random.default_rng(seed))
        order = int(out["order"])
        counts[order] += 1
        perm = permutations(3)[order]
        assert out["order"].dtype == np.int64 and out["order"].shape == ()
        assert np.array_equal(out["clips"], ordered.reshape(3, 2, 2, 2, 1)[list(perm)])
    # 3000 draws, p = 1/6: 500 each, sd 20.4; a 5-sd band
    assert counts.min() > 400 and counts.max() < 600, counts


def test_unshuffling_by_the_label_gives_frames_in_increasing_time(counting: VideoInfo) -> None:
    m = make_modality("video", **ORDER, jitter_p=0.0)
    seen = set()
    for seed in range(12):
        out = m.sample(counting, np.random.default_rng(seed), True)
        clips, order = out["clips"], int(out["order"])
        assert clips.shape == (3, 4, 16, 16, 1) and clips.dtype == np.uint8 and clips.flags.c_contiguous
        seen.add(order)
        unshuffled = clips[np.argsort(permutations(3)[order])]
        got = frame_numbers(unshuffled)  # [3, 4]
        start = got[0, 0]  # sub-clip k holds frames start + 5k .. start + 5k + 3 (4 frames, 1 skipped)
        assert 0 <= start <= 2, got
        assert np.array_equal(got, start + np.arange(4)[None] + 5 * np.arange(3)[:, None]), (seed, got)
    assert len(seen) >= 4  # the label varies with the sample's seed


def test_tuples_reproduce_for_a_seed_and_share_one_jitter(counting: VideoInfo) -> None:
    m = make_modality("video", **ORDER, jitter_p=1.0)
    a, b = (m.sample(counting, np.random.default_rng(7), True) for _ in range(2))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    others = [m.sample(counting, np.random.default_rng(s), True) for s in range(8, 14)]
    assert any(not np.array_equal(a["clips"], o["clips"]) for o in others)
    # one brightness/contrast LUT for all sub-clips: un-shuffled, the means still rise with time
    means = a["clips"][np.argsort(permutations(3)[int(a["order"])])].reshape(12, -1).mean(axis=1)
    assert (np.diff(means) > 0).all(), means


def test_blank_matches_the_sample_and_eval_stays_the_centred_clip(counting: VideoInfo) -> None:
    m = make_modality("video", **ORDER)
    out, blank = m.sample(counting, np.random.default_rng(0), True), m.blank(True)
    assert {k: (v.shape, v.dtype) for k, v in blank.items()} == {k: (v.shape, v.dtype) for k, v in out.items()}
    ev = m.sample(counting, np.random.default_rng(0), False)
    assert list(ev) == ["video"] and ev["video"].shape == m.blank(False)["video"].shape == (8, 16, 16, 1)


def test_indices_fit_the_video_or_clamp_to_its_last_frame() -> None:
    rng = np.random.default_rng(0)
    starts = {tuple_indices(100, 3, 4, 2, 3, rng)[0] for _ in range(200)}
    span = 2 * (4 * 2 + 3) + 3 * 2 + 1  # 29 frames
    assert min(starts) == 0 and max(starts) == 100 - span
    assert tuple_indices(6, 2, 4, 1, 0, rng) == [0, 1, 2, 3, 4, 5, 5, 5]  # shorter than the span


@pytest.mark.parametrize("bad, match", [({"order_clips": 1}, "order_clips=1"), ({"order_clips": 6}, "order_clips=6"),
                                        ({"order_clip_frames": 0}, "order_clip_frames=0"),
                                        ({"order_gap": -1}, "order_gap=-1")])
def test_bad_order_arguments_raise_naming_them(bad: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_modality("video", **{**ORDER, **bad})
