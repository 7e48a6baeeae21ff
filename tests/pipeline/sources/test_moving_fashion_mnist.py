"""Moving Fashion-MNIST: recoverable directions, paths inside the canvas, MP4 round trips, the source."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from selfsup.pipeline.modalities.video import VideoModality, encode_clip_mp4
from selfsup.pipeline.seeding import rng_for
from selfsup.pipeline.sources import SOURCES, with_label
from selfsup.pipeline.sources.fashion_mnist import fmnist_arrays
from selfsup.pipeline.sources.moving_fashion_mnist import MovingFashionMNISTSource, clip_params, render_clip
from tests.conftest import FMNIST as FMNIST_PATH

FMNIST = str(FMNIST_PATH)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Fashion-MNIST test images [10000, 28, 28] uint8."""
    return fmnist_arrays(FMNIST, "test")[0]


def direction_of(clip: np.ndarray) -> int:
    """The nearest of 8 directions to the centre-of-mass displacement from the first to the last frame."""
    gray = clip.astype(np.float64)  # [T, H, W]
    ys, xs = np.mgrid[: gray.shape[1], : gray.shape[2]]

    def com(frame: np.ndarray) -> tuple[float, float]:
        return float((frame * xs).sum() / frame.sum()), float((frame * ys).sum() / frame.sum())

    (x0, y0), (x1, y1) = com(gray[0]), com(gray[-1])
    angle = math.atan2(-(y1 - y0), x1 - x0)  # image y points down
    return int(round(angle / (math.pi / 4))) % 8


def test_direction_recovered_from_rendered_frames(images: np.ndarray) -> None:
    seen = set()
    for i in range(300):
        direction, speed, start = clip_params(rng_for("moving", 0, "test", i))
        clip = render_clip(images[i], direction, speed, start)
        assert clip.shape == (16, 64, 64) and clip.dtype == np.uint8
        assert direction_of(clip) == direction, i
        assert 1.0 <= speed <= 2.0
        seen.add(direction)
    assert seen == set(range(8))


def test_whole_path_stays_inside_the_canvas(images: np.ndarray) -> None:
    for i in range(300):
        direction, speed, start = clip_params(rng_for("moving", 1, "train", i))
        clip = render_clip(images[i], direction, speed, start)
        totals = clip.reshape(16, -1).sum(axis=1, dtype=np.int64)
        assert (totals == int(images[i].sum(dtype=np.int64))).all(), i  # no item pixel cut at a border
    with pytest.raises(ValueError, match="leaves"):
        render_clip(images[0], 0, 2.0, (30, 10))


def test_mp4_round_trip_keeps_the_direction(images: np.ndarray) -> None:
    m = VideoModality(frames=16, stride=1, size=64, output="single")
    for i in range(12):
        direction, speed, start = clip_params(rng_for("moving", 2, "test", i))
        clip = render_clip(images[i], direction, speed, start)  # [16, 64, 64]
        data = encode_clip_mp4(np.repeat(clip[..., None], 3, axis=3), fps=8)
        video = m.sample(m.decode({"mp4": data}), np.random.default_rng(0), False)["video"]  # [16, 64, 64, 3]
        assert video.shape == (16, 64, 64, 3)
        assert direction_of(video[..., 0]) == direction
        assert np.abs(video[..., 0].astype(int) - clip).mean() < 2.0  # near-lossless


def test_source_items_are_reproducible_and_encode_labelled_clips() -> None:
    assert SOURCES.get("moving-fashion-mnist") is MovingFashionMNISTSource
    assert MovingFashionMNISTSource.detect(FMNIST) and not MovingFashionMNISTSource.detect("/nonexistent")
    src = MovingFashionMNISTSource(FMNIST, subset="test", seed=3)
    items, names = src.items()
    labels = fmnist_arrays(FMNIST, "test")[1]
    assert len(items) == 10000 and len(names) == 10 and len({it.key for it in items}) == 10000
    assert [it.label for it in items[:50]] == [int(x) for x in labels[:50]]
    assert items[7].extra == MovingFashionMNISTSource(FMNIST, subset="test", seed=3).items()[0][7].extra
    assert items[7].extra != MovingFashionMNISTSource(FMNIST, subset="test", seed=4).items()[0][7].extra
    motions = [it.extra["motion"] for it in items]
    assert set(motions) == set(range(8)) and max(np.bincount(motions)) < 1400
    members = with_label(src.encode(items[7]), items[7], names)
    assert members["mp4"] == src.encode(items[7])["mp4"]  # deterministic bytes
    meta = json.loads(members["json"])
    assert meta["motion"] == items[7].extra["motion"] and meta["item_index"] == 7
    m = VideoModality(frames=16, stride=1, size=64, output="single")
    video = m.sample(m.decode(members), np.random.default_rng(0), False)["video"]
    assert direction_of(video[..., 0]) == meta["motion"]
    assert (video[..., 0] == video[..., 2]).mean() > 0.95  # gray replicated to 3 channels
    unlabelled, none = MovingFashionMNISTSource(FMNIST, subset="test", labels="none").items()
    assert none == [] and unlabelled[0].label is None and unlabelled[0].extra == {}
