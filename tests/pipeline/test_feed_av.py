"""Audio and video through the feed: promised shapes, exact mask counts, exactly once, resume, quarantine, eval."""
from __future__ import annotations

import io
import json
from typing import Any, Sequence

import numpy as np
import pytest
import soundfile

from selfsup.pipeline import storage
from selfsup.pipeline.batch import FeedSpec
from selfsup.pipeline.feed import BatchFeed
from selfsup.pipeline.masking import conv_frames, make_mask
from selfsup.pipeline.modalities.video import encode_clip_mp4
from selfsup.pipeline.seeding import sample_rng
from selfsup.pipeline.snapshot import SourceSpec, build_snapshot
from tests.conftest import FSDD, VIDEO, add_shard, planned_keys, run_cli, shard_keys, texture_clip

WAV2VEC2_CONV = [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2  # 1 s at 8 kHz → 24 frames
AUDIO = {"sample_rate": 8000, "seconds": 1.0, "output": "wave"}  # FSDD is 8 kHz: no resampling
SPAN = {"kind": "span", "ratio": 0.5, "mask_length": 3, "geometry": {"conv_layers": WAV2VEC2_CONV}}
VIDEO_ARGS = {"frames": 4, "stride": 2, "size": 32}
TUBE = {"kind": "tube", "ratio": 0.75, "geometry": {"tubelet": [2, 8, 8]}}  # grid (2, 4, 4)


def write(source: Any, dest: str, modality: str, *args: str) -> Any:
    res = run_cli("shards", "write", str(source), dest, "--modality", modality, "--workers", "1", "--quiet", *args)
    assert res.returncode == 0, res.stderr
    split = args[args.index("--split") + 1] if "--split" in args else "pretrain"
    return build_snapshot([SourceSpec(url=dest, split=split)])


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """200 unlabeled FSDD recordings in 4 shards."""
    return write(FSDD, str(tmp_path_factory.mktemp("fsdd") / "ds"), "audio", "--limit", "200",
                 "--samples-per-shard", "50")


def take(feed: BatchFeed, n: int) -> list[dict[str, Any]]:
    return [feed.next() for _ in range(n)]


def keys_of(batches: Sequence[dict[str, Any]]) -> list[str]:
    return [str(k) for b in batches for k, ok in zip(b["key"], b["valid"]) if ok]


def wav_samples(key: str) -> np.ndarray:
    """The recording as float32 [n] at its native 8 kHz."""
    x, rate = soundfile.read(FSDD / f"{key}.wav", dtype="float32", always_2d=True)
    assert rate == 8000
    return x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]


def test_audio_wave_batches_have_fixed_shapes_lengths_and_exact_span_masks(speech: Any) -> None:
    spec = FeedSpec(speech, 16, modality_args=AUDIO, seed=3, mask=SPAN)
    with BatchFeed(spec, 0, 1, backend="inline") as feed:
        batches = take(feed, 3)
    count = round(0.5 * 24)
    for b in batches:
        assert b["wave"].shape == (16, 8000) and b["wave"].dtype == np.float32
        assert b["length"].shape == (16,) and b["length"].dtype == np.int64
        assert b["mask"].shape == (16, 24) and b["mask"].dtype == bool
        assert (b["mask"].sum(axis=1) == count).all()  # exact count on every row
        for row in range(16):
            n = len(wav_samples(str(b["key"][row])))
            length = int(b["length"][row])
            assert length == min(n, 8000) and not b["wave"][row, length:].any()  # padding stays silent
            valid = conv_frames(length, WAV2VEC2_CONV)
            mask = b["mask"][row]
            if valid >= count:
                assert not mask[valid:].any()  # spans stay inside the real audio
            else:
                assert mask[:valid].all()  # the tail is used only once the real frames are all masked
    # masks are seeded by (seed, epoch, shard, key), so anyone can recompute them
    b, row = batches[0], 5
    rng = sample_rng(3, 0, str(b["shard"][row]), str(b["key"][row]), "mask")
    valid = conv_frames(int(b["length"][row]), WAV2VEC2_CONV)
    assert np.array_equal(make_mask(SPAN, (24,), rng, valid=valid), b["mask"][row])


def test_audio_logmel_views_have_the_promised_shapes(speech: Any) -> None:
    spec = FeedSpec(speech, 8, modality_args={**AUDIO, "output": "logmel", "n_mels": 32}, seed=3)
    with BatchFeed(spec, 0, 1, backend="inline") as feed:
        b = feed.next()
    for name in ("view1", "view2"):
        assert b[name].shape == (8, 32, 50) and b[name].dtype == np.float32  # 8000 // 160 frames
        assert np.isfinite(b[name]).all()
    assert not np.array_equal(b["view1"], b["view2"])


def test_audio_two_ranks_exactly_once_and_resume_on_one_rank(speech: Any) -> None:
    spec = FeedSpec(speech, 16, modality_args=AUDIO, seed=4, mask=SPAN)
    ranks = [BatchFeed(spec, r, 2, backend="inline") for r in range(2)]
    steps = ranks[0].steps_per_epoch()
    assert steps == 6  # 200 // 16 = 12 micro-batches, 6 per rank
    got = [[], []]  # type: list[list[dict[str, Any]]]
    for k in range(steps):
        for r in range(2):
            got[r].append(ranks[r].next())
        if k == 1:
            state = ranks[0].state_dict()
            assert state == ranks[1].state_dict() == {"epoch": 0, "consumed": 4}
    per_rank = [keys_of(g) for g in got]
    assert not set(per_rank[0]) & set(per_rank[1])
    union = per_rank[0] + per_rank[1]
    assert len(union) == len(set(union)) == 192
    keys = shard_keys(speech)
    assert set(union) == {k for i in range(12) for k in planned_keys(spec, keys, 0, i)}
    # resume the same position on one rank: the remaining micro-batches, byte for byte
    with BatchFeed(spec, 0, 1, backend="inline") as one:
        one.load_state_dict(state)
        rest = take(one, one.steps_left_in_epoch())
    assert [int(b["index"]) for b in rest] == list(range(4, 12))
    for b in rest:
        i = int(b["index"])
        want = got[i % 2][i // 2]
        assert_same_batch_av(b, want, ("wave", "length", "mask"))
    assert not set(keys_of(rest)) & set(keys_of([g for r in range(2) for g in got[r][:2]]))


def assert_same_batch_av(got: dict[str, Any], want: dict[str, Any], arrays: Sequence[str]) -> None:
    for name in (*arrays, "key", "shard", "position", "quarantined", "valid"):
        assert np.array_equal(got[name], want[name]), name


# ---------------------------------------------------------------- bad data


def run_epoch(spec: FeedSpec, quarantine_url: str) -> tuple[list[dict[str, Any]], int]:
    with BatchFeed(spec, 0, 1, backend="inline", quarantine_url=quarantine_url) as feed:
        steps = feed.steps_per_epoch()
        return take(feed, steps), steps


def check_quarantine(spec: FeedSpec, batches: list[dict[str, Any]], steps: int, bad: dict[str, str],
                     quarantine_url: str, arrays: Sequence[str]) -> None:
    """Exactly the bad keys flagged (slot filled from the same batch), listed once each, steps as planned."""
    plan = spec.plan(0)
    assert steps == plan.num_batches and len(batches) == steps
    keys = shard_keys(spec.snapshot)
    flagged = []
    for i, b in enumerate(batches):
        assert list(b["key"]) == planned_keys(spec, keys, 0, i)
        for slot in np.flatnonzero(b["quarantined"]):
            flagged.append(str(b["key"][slot]))
            assert any(all(np.array_equal(b[a][slot], b[a][j]) for a in arrays)
                       for j in np.flatnonzero(~b["quarantined"]))
    assert sorted(flagged) == sorted(bad)
    lines = [json.loads(x) for x in storage.read_text(quarantine_url).splitlines()]
    assert sorted(r["key"] for r in lines) == sorted(bad)
    for rec in lines:
        assert bad[rec["key"]] in rec["error"], rec


def test_truncated_and_empty_wavs_are_quarantined_without_changing_steps(tmp_path: Any) -> None:
    wavs = sorted(FSDD.glob("*_lucas_*.wav"))[:24]
    samples = [(p.stem, {"wav": p.read_bytes()}) for p in wavs]
    whole = samples[5][1]["wav"]
    samples[5] = (samples[5][0], {"wav": whole[: len(whole) // 2]})
    samples[18] = (samples[18][0], {"wav": b""})
    dest = str(tmp_path / "bad")
    add_shard(dest, "pretrain-bad-000000", samples, "audio")
    spec = FeedSpec(build_snapshot([SourceSpec(url=dest)]), 8, modality_args=AUDIO, seed=0, mask=SPAN)
    qurl = str(tmp_path / "run" / "quarantine.jsonl")
    batches, steps = run_epoch(spec, qurl)
    assert steps == 3
    bad = {samples[5][0]: "truncated WAV", samples[18][0]: "empty (0 bytes)"}
    check_quarantine(spec, batches, steps, bad, qurl, ("wave", "length", "mask"))


def test_a_sample_its_index_calls_huge_and_an_odd_sample_rate_are_quarantined(tmp_path: Any) -> None:
    """The index gives the last sample 10 TB: it is quarantined on that size, unread; a 500 Hz WAV fails decode."""
    wavs = sorted(FSDD.glob("*_lucas_*.wav"))[:16]
    samples = [(p.stem, {"wav": p.read_bytes()}) for p in wavs]
    low = io.BytesIO()
    soundfile.write(low, np.zeros(500, np.int16), 500, format="WAV", subtype="PCM_16")
    samples[6] = (samples[6][0], {"wav": low.getvalue()})
    dest = tmp_path / "bad"
    add_shard(str(dest), "pretrain-bad-000000", samples, "audio")
    index = json.loads((dest / "pretrain-bad-000000.idx").read_text())
    offset, _, crc = index["members"][-1]["wav"]
    index["ends"][-1] = 10**13
    index["members"][-1]["wav"] = [offset, 10**13 - offset, crc]
    (dest / "pretrain-bad-000000.idx").write_text(json.dumps(index))
    spec = FeedSpec(build_snapshot([SourceSpec(url=str(dest))]), 8, modality_args=AUDIO, seed=0, mask=SPAN)
    qurl = str(tmp_path / "run" / "quarantine.jsonl")
    batches, steps = run_epoch(spec, qurl)
    bad = {samples[6][0]: "sample rate 500 Hz is outside 1000-384000 Hz",
           samples[-1][0]: f"SampleTooLarge: sample is {10**13 - index['starts'][-1]} bytes in its shard index, "
                           f"over the limit of {64_000_000 + 2**20} for audio: not read"}
    check_quarantine(spec, batches, steps, bad, qurl, ("wave", "length", "mask"))


def corrupt_mp4(seed: int) -> bytes:
    """A small H.264 clip with the middle fifth of its frame data overwritten by noise."""
    good = encode_clip_mp4(texture_clip(8, size=64, seed=seed), fps=8)
    mdat, moov = good.index(b"mdat"), good.index(b"moov")
    a, b = mdat + int(0.45 * (moov - mdat)), mdat + int(0.65 * (moov - mdat))
    bad = bytearray(good)
    bad[a:b] = np.random.default_rng(seed).integers(0, 256, b - a, dtype=np.uint8).tobytes()
    return bytes(bad)


def test_a_video_with_a_corrupt_frame_is_quarantined_without_changing_steps(tmp_path: Any) -> None:
    samples = [(f"clip-{i}", {"mp4": encode_clip_mp4(texture_clip(8, size=64, seed=i), fps=8)}) for i in range(6)]
    samples[3] = ("clip-3", {"mp4": corrupt_mp4(3)})
    dest = str(tmp_path / "bad")
    add_shard(dest, "pretrain-bad-000000", samples, "video")
    spec = FeedSpec(build_snapshot([SourceSpec(url=dest)]), 2, modality_args=VIDEO_ARGS, seed=0, mask=TUBE)
    qurl = str(tmp_path / "run" / "quarantine.jsonl")
    batches, steps = run_epoch(spec, qurl)
    assert steps == 3
    check_quarantine(spec, batches, steps, {"clip-3": "corrupt video data"}, qurl, ("view1", "view2", "mask"))


# ---------------------------------------------------------------- video shapes, through Ray


@pytest.mark.usefixtures("ray_cluster")
def test_real_videos_give_uint8_clips_and_tube_masks_from_a_ray_stream(tmp_path: Any) -> None:
    snap = write(VIDEO, str(tmp_path / "vid"), "video", "--samples-per-shard", "1")
    assert snap.n_samples == 2
    spec = FeedSpec(snap, 2, modality_args=VIDEO_ARGS, seed=0, mask=TUBE)
    with BatchFeed(spec, 0, 1, streams=1, prefetch=1, backend="ray", stream_cpus=0.25) as feed:
        b = feed.next()
    with BatchFeed(spec, 0, 1, backend="inline") as feed:
        assert_same_batch_av(feed.next(), b, ("view1", "view2", "mask"))
    assert sorted(b["key"]) == ["tree", "vtest"] and not b["quarantined"].any()
    for name in ("view1", "view2"):
        assert b[name].shape == (2, 4, 32, 32, 3) and b[name].dtype == np.uint8
        assert b[name].std() > 5  # real pictures, not blanks
    assert b["mask"].shape == (2, 32) and b["mask"].dtype == bool
    for row in b["mask"]:
        assert row.sum() == 2 * round(0.75 * 16)  # T * round(ratio * H * W)
        assert np.array_equal(row[:16], row[16:])  # the same spatial mask at every time step
    assert not np.array_equal(b["mask"][0], b["mask"][1])  # each clip its own mask
    eval_spec = FeedSpec(snap, 4, modality_args=VIDEO_ARGS, train=False)
    with BatchFeed(eval_spec, 0, 1, backend="inline") as feed:
        e = feed.next()
    assert e["video"].shape == (4, 4, 32, 32, 3) and e["video"].dtype == np.uint8
    assert list(e["valid"]) == [True, True, False, False] and not e["video"][2:].any()


# ---------------------------------------------------------------- eval


def test_eval_delivers_every_labeled_recording_once_with_padding_flagged(tmp_path: Any) -> None:
    snap = write(FSDD, str(tmp_path / "probe"), "audio", "--split", "probe-test", "--limit", "50",
                 "--samples-per-shard", "20")
    assert [s.n_samples for s in snap.shards] == [20, 20, 10]
    # half a second: many recordings are longer, so the centred crop is exercised too
    spec = FeedSpec(snap, 16, modality_args={**AUDIO, "seconds": 0.5}, train=False, label="cls")
    with BatchFeed(spec, 0, 1, backend="inline") as feed:
        steps = feed.steps_per_epoch()
        assert steps == 4
        batches = take(feed, steps)
    keys = keys_of(batches)
    assert len(keys) == len(set(keys)) == 50
    all_keys = [shard_keys(snap)[(s.url, p)] for s in snap.shards for p in range(s.n_samples)]
    assert keys == all_keys  # eval walks the shards in order
    last = batches[-1]
    assert list(last["valid"]) == [True] * 2 + [False] * 14
    pad = ~last["valid"]
    assert (last["key"][pad] == "").all() and (last["label"][pad] == -1).all()
    assert (last["position"][pad] == -1).all() and (last["length"][pad] == 0).all() and not last["wave"][pad].any()
    cropped = 0
    for b in batches:
        assert b["wave"].shape == (16, 4000) and b["wave"].dtype == np.float32
        for row in np.flatnonzero(b["valid"]):
            key = str(b["key"][row])
            assert b["label"][row] == int(key.split("_")[0])  # the digit
            x = wav_samples(key)
            n = int(b["length"][row])
            assert n == min(len(x), 4000)
            start = (len(x) - 4000) // 2 if len(x) > 4000 else 0  # the centred crop, unaugmented
            cropped += start > 0
            assert np.array_equal(b["wave"][row, :n], x[start: start + n])
    assert cropped > 5
