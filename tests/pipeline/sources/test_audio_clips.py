"""`audio-clips`: seeded clips of long sound files; a general-audio dataset mixed with spoken digits by weight."""
from __future__ import annotations

import collections
import io

import numpy as np
import pytest
import soundfile

from selfsup.jobs.cli import main
from selfsup.pipeline.plan import plan_epoch
from selfsup.pipeline.snapshot import SourceSpec, build_snapshot
from selfsup.pipeline.sources import SourceOptions, detect_source, make_source
from selfsup.pipeline.sources.audio_clips import windows
from tests.conftest import FSDD, SOUNDFONT


@pytest.mark.parametrize("seconds", [0.4, 1.5, 2.0, 7.3, 61.0])
def test_clips_lie_inside_the_file_never_overlap_and_reproduce(seconds):
    clips = windows(seconds, 0, "a.ogg")
    assert clips == windows(seconds, 0, "a.ogg") and len(clips) >= 1
    ends = [(s, s + n) for s, n in clips]
    assert all(0 <= s < e <= seconds + 1e-9 for s, e in ends)
    assert all(e0 <= s1 for (_, e0), (s1, _) in zip(ends, ends[1:]))
    if seconds >= 2:
        assert all(1.0 <= n <= 2.0 for _, n in clips) and len(clips) == int(seconds // 2) + (seconds % 2 >= 1)
        assert windows(seconds, 1, "a.ogg") != clips  # the seed places them
    else:
        assert clips == [(0.0, seconds)]


@pytest.fixture
def sounds(tmp_path):
    """A folder with a 7.5 s stereo 44.1 kHz WAV and a 0.5 s Ogg Vorbis mono clip."""
    t = np.arange(int(7.5 * 44100)) / 44100
    soundfile.write(tmp_path / "long.wav", np.stack([np.sin(2 * np.pi * 300 * t)] * 2, axis=1) * 0.3, 44100)
    soundfile.write(tmp_path / "short.ogg", np.sin(2 * np.pi * 500 * t[:22050]) * 0.3, 44100, format="OGG")
    return tmp_path


def test_clips_are_16khz_mono_flac_of_their_window(sounds):
    source = make_source("audio-clips", str(sounds), SourceOptions("audio"))
    assert detect_source(str(sounds), "audio") == "folder"  # never detected: named only
    items, names = source.items()
    assert names == [] and [it.key for it in items] == ["long-c0000", "long-c0001", "long-c0002", "long-c0003",
                                                               "short-c0000"]
    for it in items:
        wave, rate = soundfile.read(io.BytesIO(source.encode(it)["flac"]))
        assert rate == 16000 and wave.ndim == 1 and abs(len(wave) - it.extra["seconds"] * 16000) <= 2
        assert 0.2 < np.abs(wave).max() < 0.4 and it.label is None


def test_a_general_audio_dataset_mixes_with_spoken_digits_by_weight(sounds, tmp_path):
    """Clips and SoundFont notes written into one dataset, FSDD into another, one snapshot weighting them 3:1."""
    general, digits = str(tmp_path / "general-audio"), str(tmp_path / "fsdd")
    common = ["--modality", "audio", "--split", "pretrain", "--workers", "1", "--quiet", "--samples-per-shard", "8"]
    assert main(["shards", "write", str(sounds), general, "--source-type", "audio-clips", *common]) == 0
    assert main(["shards", "write", str(SOUNDFONT / "TimGM6mb.sf2"), general, "--source-type", "soundfont",
                 "--subset", "all", "--limit", "16", *common]) == 0
    assert main(["shards", "write", str(FSDD), digits, "--limit", "40", *common]) == 0
    snap = build_snapshot([SourceSpec(digits, weight=1.0, name="fsdd"), SourceSpec(general, weight=3.0, name="gen")])
    sizes = collections.Counter()
    for s in snap.shards:
        sizes[s.source] += s.n_samples
    assert sizes == {"fsdd": 40, "gen": 5 + 16}
    plan = plan_epoch(snap, 0, 0, 4)
    source = [snap.shards[shard].source for i in range(plan.num_batches) for shard, lo, hi in plan.batch(i)
              for _ in range(lo, hi)]
    counts = collections.Counter(source)
    assert counts["gen"] == 21 and counts["fsdd"] == 7  # all 21 general clips, a third as many digits
