"""Video modality on real AVIs and made MP4s: clip shapes, seeking, crops, flips, corruption, limits, re-encoding."""
from __future__ import annotations

import dataclasses
import io
import os
from fractions import Fraction
from typing import Any

import av
import numpy as np
import pytest

from selfsup.pipeline.modalities import MODALITIES, DecodeError, make_modality
from selfsup.pipeline.modalities.video import (
    VideoModality,
    clip_indices,
    encode_clip_mp4,
    encode_mp4,
    read_frames,
    reencode_mp4,
)
from tests.conftest import VIDEO, texture_clip

VIDEOS = str(VIDEO)


def load(name: str) -> bytes:
    """Bytes of a shared video."""
    with open(os.path.join(VIDEOS, name), "rb") as f:
        return f.read()


def rng(seed: int) -> np.random.Generator:
    """A fresh generator for `seed`."""
    return np.random.default_rng(seed)


def reference_frames(data: bytes, indices: list[int]) -> list[np.ndarray]:
    """What a player shows at each frame slot (the latest frame at or before it; pts = slot in these
    files), by a plain sequential decode from the start with no seeking."""
    with av.open(io.BytesIO(data)) as c:
        pts = sorted(int(p.pts) for p in c.demux(c.streams.video[0]) if p.pts is not None)
    shown = {i: max(p for p in pts if p <= i) for i in indices}
    with av.open(io.BytesIO(data)) as c:
        arrays = {int(f.pts): f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])
                  if f.pts in shown.values()}
    return [arrays[shown[i]] for i in indices]


@pytest.fixture(scope="module")
def tree() -> bytes:
    """tree.avi: 320x240 Cinepak, 444 frame slots but only 68 coded frames (the rest dropped)."""
    return load("tree.avi")


@pytest.fixture(scope="module")
def vtest() -> bytes:
    """vtest.avi: 768x576 MS-MPEG4, 795 frames, keyframes every 250."""
    return load("vtest.avi")


@pytest.mark.parametrize("name", ["vtest.avi", "tree.avi"])
def test_real_clips_give_fixed_shape_uint8_views(name: str) -> None:
    data = load(name)
    m = make_modality("video", frames=8, stride=2, size=64)
    info = m.decode({"avi": data})
    assert info.frames == {"vtest.avi": 795, "tree.avi": 444}[name]
    two, ev = m.sample(info, rng(0), True), m.sample(info, rng(0), False)
    single = VideoModality(frames=8, stride=2, size=64, output="single").sample(info, rng(0), True)
    for out, keys in ((two, ["view1", "view2"]), (ev, ["video"]), (single, ["video"])):
        assert sorted(out) == keys
        for v in out.values():
            assert v.shape == (8, 64, 64, 3) and v.dtype == np.uint8 and v.flags.c_contiguous and v.any()
    assert not np.array_equal(two["view1"], two["view2"])
    assert {k: v.shape for k, v in m.blank(True).items()} == {k: v.shape for k, v in two.items()}
    assert m.blank(False)["video"].shape == ev["video"].shape
    assert np.array_equal(ev["video"], m.sample(info, rng(5), False)["video"])
    again, other = m.sample(info, rng(0), True), m.sample(info, rng(1), True)
    assert all(np.array_equal(two[k], again[k]) for k in two)
    assert not np.array_equal(two["view1"], other["view1"])


@pytest.mark.parametrize("name, indices", [("vtest.avi", [240, 245, 250, 255, 600]), ("tree.avi", [0, 5, 11, 12, 300])])
def test_seeking_reads_the_same_frames_as_a_full_decode(name: str, indices: list[int]) -> None:
    data = load(name)
    info = VideoModality().decode({"avi": data})
    expected = reference_frames(data, indices)
    for first in range(len(indices)):  # each read seeks to its own first index
        got = read_frames(info, indices[first:], "rgb24", info.width, info.height)
        for index, img, ref in zip(indices[first:], got, expected[first:]):
            assert np.array_equal(img, ref), index


def test_eval_takes_the_centre_clip_and_centre_crop(tree: bytes) -> None:
    m = VideoModality(frames=4, stride=10, size=240)
    info = m.decode({"avi": tree})
    start = (444 - 31) // 2
    expected = reference_frames(tree, [start + 10 * k for k in range(4)])
    out = m.sample(info, rng(0), False)["video"]  # [4, 240, 240, 3]
    for k in range(4):
        assert np.array_equal(out[k], expected[k][:, 40:280])


def test_short_video_repeats_its_last_frame() -> None:
    data = encode_clip_mp4(texture_clip(5), fps=8)
    out = VideoModality(frames=8, stride=1, size=64, output="single").sample(
        VideoModality().decode({"mp4": data}), rng(0), False)["video"]
    assert all(np.array_equal(out[k], out[4]) for k in range(5, 8))
    assert not np.array_equal(out[3], out[4])
    assert clip_indices(5, 8, 1, 0) == [0, 1, 2, 3, 4, 4, 4, 4]


def test_flip_off_never_flips_and_on_does() -> None:
    ramp = np.broadcast_to((np.arange(64) * 4).astype(np.uint8)[None, None, :, None], (16, 64, 64, 3))
    data = encode_clip_mp4(np.ascontiguousarray(ramp), fps=8)

    def flipped(flip: bool) -> list[bool]:
        m = VideoModality(frames=4, stride=4, size=32, flip=flip)
        info = m.decode({"mp4": data})
        views = [v for i in range(24) for v in m.sample(info, rng(i), True).values()]
        return [bool(v[:, :, :4].astype(int).mean() > v[:, :, -4:].astype(int).mean()) for v in views]

    assert not any(flipped(False))
    assert 10 < sum(flipped(True)) < 38


def test_one_crop_box_for_every_frame() -> None:
    data = encode_clip_mp4(texture_clip(16, moving=False), fps=8)
    m = VideoModality(frames=8, stride=2, size=32, output="single", scale=(0.2, 0.5))
    info = m.decode({"mp4": data})
    for i in range(6):
        v = m.sample(info, rng(i), True)["video"].astype(int)  # [8, 32, 32, 3]
        assert np.abs(v - v[0]).max() <= 4  # a static scene stays static: the box never moves
    moving = m.decode({"mp4": encode_clip_mp4(texture_clip(16), fps=8)})
    v = m.sample(moving, rng(0), True)["video"].astype(int)
    assert np.abs(v[-1] - v[0]).mean() > 10  # and the check can see motion


def test_corrupt_and_truncated_videos_raise_decode_error(vtest: bytes) -> None:
    good = encode_clip_mp4(texture_clip(32, seed=3), fps=8)
    mdat = good.index(b"mdat")
    corrupt = bytearray(good)
    middle = (mdat + good.index(b"moov")) // 2 if good.index(b"moov") > mdat else (mdat + len(good)) // 2
    corrupt[middle: middle + 64] = rng(1).integers(0, 256, 64, dtype=np.uint8).tobytes()
    junk = rng(2).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    m = VideoModality(frames=32, stride=1, size=64, output="single")
    for data in (bytes(corrupt), good[: len(good) * 2 // 3], b"", junk):
        with pytest.raises(DecodeError):
            m.sample(m.decode({"mp4": data}), rng(0), False)
    with pytest.raises(DecodeError):
        m.decode({"wav": good})
    cut = m.decode({"avi": vtest[: len(vtest) // 2]})  # the header still promises 795 frames
    assert cut.frames == 795
    with pytest.raises(DecodeError):
        read_frames(cut, [700, 701], "rgb24", 64, 64)
    short = dataclasses.replace(m.decode({"mp4": good}), frames=64)  # ends 32 frames early
    assert len(read_frames(short, [20, 31, 38], "rgb24", 64, 64)) == 3  # within a second (8 frames): padded
    with pytest.raises(DecodeError, match="truncated"):
        read_frames(short, [60, 61], "rgb24", 64, 64)


def test_limits_reject_oversize_and_overlong_videos(tree: bytes) -> None:
    for kwargs, word in (({"max_frames": 100}, "max_frames"), ({"max_pixels_per_frame": 320 * 200}, "max_pixels"),
                         ({"max_seconds": 10}, "max_seconds"), ({"max_bytes": 1000}, "max_bytes")):
        with pytest.raises(DecodeError, match=word):
            VideoModality(**kwargs).decode({"avi": tree})
    VideoModality(max_frames=444, max_pixels_per_frame=320 * 240, max_seconds=30).decode({"avi": tree})


def test_reencode_keeps_every_frame_slot_with_keyframes_at_the_interval(tree: bytes) -> None:
    out = reencode_mp4(tree, keyframe_interval=8)
    checked = [0, 11, 100, 443]
    src = dict(zip(checked, reference_frames(tree, checked)))
    with av.open(io.BytesIO(out)) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.average_rate == 15
        frames = list(c.decode(stream))
    assert len(frames) == 444
    assert [i for i, f in enumerate(frames) if f.key_frame] == list(range(0, 444, 8))
    for k in checked:
        a, b = frames[k].to_ndarray(format="rgb24").astype(float), src[k].astype(float)
        assert 10 * np.log10(255**2 / np.mean((a - b) ** 2)) > 30, k
    info = VideoModality().decode({"mp4": out})
    assert (info.frames, info.width, info.height) == (444, 320, 240)


def test_mpeg4_fallback_also_honours_the_keyframe_interval() -> None:
    data = encode_mp4(iter(texture_clip(12)), 64, 64, Fraction(8), 4, 20, "yuv420p", codec="mpeg4")
    with av.open(io.BytesIO(data)) as c:
        keys = [i for i, f in enumerate(c.decode(c.streams.video[0])) if f.key_frame]
    assert keys == [0, 4, 8]


def test_token_grid_and_config_errors() -> None:
    m = VideoModality(frames=16, size=112)
    assert m.token_grid({"tubelet": [2, 16, 16]}) == (8, 7, 7)
    assert m.valid_tokens(m.blank(True), {"tubelet": [2, 16, 16]}) == 392
    with pytest.raises(ValueError, match="not divisible"):
        m.token_grid({"tubelet": [3, 16, 16]})
    with pytest.raises(ValueError, match="output"):
        VideoModality(output="three")
    assert "video" in MODALITIES


class NoSpare(list):
    """A VideoInfo.spare that keeps nothing: every clip opens the video anew (the path before reuse)."""

    def append(self, item: Any) -> None:
        item[0].close()


@pytest.mark.parametrize("name", ["vtest.avi", "tree.avi"])
def test_a_sample_opens_its_video_once_and_gives_the_frames_fresh_opens_give(name: str,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from selfsup.pipeline.modalities import video as video_module

    data = load(name)
    opens: list[int] = []
    real = video_module.open_video

    def counting(d: Any) -> Any:
        opens.append(1)
        return real(d)

    monkeypatch.setattr(video_module, "open_video", counting)
    for output in ("two", "order"):
        m = VideoModality(frames=8, stride=2, size=48, output=output)
        for seed in range(3):
            opens.clear()
            reused = m.sample(m.decode({"avi": data}), rng(seed), True)
            assert len(opens) == 1, (output, seed)  # the probe's container serves every clip (none starts at 0 here)
            info = m.decode({"avi": data})
            info.spare[0][0].close()
            object.__setattr__(info, "spare", NoSpare())
            fresh = m.sample(info, rng(seed), True)
            assert reused.keys() == fresh.keys() and len(opens) > 2
            for k in reused:
                assert reused[k].tobytes() == fresh[k].tobytes(), (output, seed, k)
    good = encode_clip_mp4(texture_clip(32, seed=3), fps=8)
    corrupt = bytearray(good)
    mdat = good.index(b"mdat")
    corrupt[mdat + 2000: mdat + 2064] = rng(1).integers(0, 256, 64, dtype=np.uint8).tobytes()
    info = VideoModality(frames=32, stride=1, size=64).decode({"mp4": bytes(corrupt)})
    assert len(info.spare) == 1
    with pytest.raises(DecodeError, match="corrupt"):
        read_frames(info, list(range(32)), "rgb24", 64, 64)
    assert info.spare == []  # a decode that failed closed its container instead of keeping it
