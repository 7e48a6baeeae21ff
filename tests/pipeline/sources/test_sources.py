"""The source registry: every source keeps the interface, detection picks by modality, settings reach sources."""
from __future__ import annotations

import gzip
import shutil
import tracemalloc

import pytest

from selfsup.pipeline.media import modality_of_ext
from selfsup.pipeline.sources import SOURCES, SourceOptions, detect_source, make_source
from selfsup.pipeline.sources.fashion_mnist import FashionMNISTSource, read_idx
from selfsup.pipeline.sources.folder import FolderSource
from selfsup.pipeline.sources.fsdd import FSDDSource
from selfsup.pipeline.sources.moving_fashion_mnist import MovingFashionMNISTSource
from selfsup.pipeline.sources.audio_clips import AudioClipsSource
from selfsup.pipeline.sources.soundfont import SoundFontSource
from tests.conftest import FMNIST, FSDD, PHOTOS, SOUNDFONT

ROOTS = {"folder": PHOTOS, "fashion-mnist": FMNIST, "fsdd": FSDD, "moving-fashion-mnist": FMNIST,
         "soundfont": SOUNDFONT / "TimGM6mb.sf2", "audio-clips": FSDD}
NAMED_ONLY = {"audio-clips"}  # never detected: `--source-type` names them


@pytest.mark.parametrize("kind", sorted(ROOTS))
def test_every_source_encodes_its_natural_modality(kind):
    """Each registered source detects its folder and writes members of the modality it declares."""
    assert SOURCES.names() == sorted(ROOTS)
    cls = SOURCES.get(kind)
    natural = cls.natural_modality
    source = make_source(kind, str(ROOTS[kind]), SourceOptions(natural or "image", labels="auto", subset="test"))
    assert type(source) is cls and cls.detect(str(ROOTS[kind])) != (kind in NAMED_ONLY)
    assert not cls.detect("/nonexistent")
    items, _ = source.items()
    assert items and len({it.key for it in items[:200]}) == len(items[:200])
    members = source.encode(items[0])
    assert [modality_of_ext(ext) for ext in members] == [natural or "image"]


@pytest.mark.parametrize("root,modality,expected", [
    (FMNIST, "image", "fashion-mnist"),
    (FMNIST, "video", "moving-fashion-mnist"),
    (FMNIST, "audio", "fashion-mnist"),   # recognized, wrong modality: the caller names --modality image
    (FSDD, "audio", "fsdd"),
    (FSDD, "image", "fsdd"),
    (PHOTOS, "image", "folder"),
    (PHOTOS, "video", "folder"),
])
def test_detection_prefers_the_source_of_the_requested_modality(root, modality, expected):
    assert detect_source(str(root), modality) == expected


def test_a_named_source_type_wins_and_an_unknown_one_lists_the_valid():
    assert detect_source(str(FMNIST), "image", "folder") == "folder"
    with pytest.raises(ValueError, match="valid: audio-clips, fashion-mnist, folder, fsdd, moving-fashion-mnist, "
                                         "soundfont"):
        detect_source(str(FMNIST), "image", "mnist")


def test_each_source_reads_only_its_settings():
    """The repr is part of the write job's digest (the shard names): it must stay as it is."""
    opts = SourceOptions("video", labels="auto", subset="test", seed=7)
    assert make_source("folder", "/d", opts) == FolderSource("/d", "video", "folder")
    assert make_source("folder", "/d", SourceOptions("image", labels="none")) == FolderSource("/d", "image", "none")
    assert make_source("fashion-mnist", "/d", opts) == FashionMNISTSource("/d", "test", "auto")
    assert make_source("fsdd", "/d", opts) == FSDDSource("/d", "auto")
    assert make_source("soundfont", "/d", opts) == SoundFontSource("/d", "test", "auto", 7)
    assert make_source("audio-clips", "/d", opts) == AudioClipsSource("/d", 7)
    with pytest.raises(ValueError, match="--subset must be one of train, test, all for a SoundFont, got 'x'"):
        make_source("soundfont", "/d", SourceOptions("audio", subset="x"))
    assert make_source("moving-fashion-mnist", "/d", opts) == MovingFashionMNISTSource("/d", "test", "auto", 7)
    assert repr(FashionMNISTSource("/d", "test", "auto")) == "FashionMNISTSource(root='/d', subset='test', labels='auto')"
    assert repr(MovingFashionMNISTSource("/d")) == ("MovingFashionMNISTSource(root='/d', subset='train', labels='auto', "
                                                    "seed=0, frames=16, canvas=64, fps=8)")


def test_a_folder_without_the_modality_suggests_the_one_it_holds():
    with pytest.raises(ValueError, match=r"no audio files .*found \d+ \.jpg files: did you mean --modality image"):
        FolderSource(str(PHOTOS), "audio").items()


def traced_peak(fn):
    """(result or exception, peak bytes Python and numpy allocated) of calling fn()."""
    tracemalloc.start()
    try:
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - returned for the test to inspect
            out = e
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("kind", ["folder", "fsdd"])
def test_a_file_over_the_item_limit_is_refused_by_name_before_it_is_read(kind, tmp_path):
    """A 300 MiB (sparse) file: the error names it and the limit, and nothing near its size is allocated."""
    if kind == "fsdd":
        for f in sorted(FSDD.glob("*.wav"))[:2]:
            shutil.copy(f, tmp_path / f.name)
    big = tmp_path / ("7_huge_0.wav" if kind == "fsdd" else "huge.jpg")
    with open(big, "wb") as f:
        f.truncate(300 * 2**20)
    modality = "audio" if kind == "fsdd" else "image"
    source = make_source(kind, str(tmp_path), SourceOptions(modality, labels="none"))
    item = next(it for it in source.items()[0] if it.ref == big.name)
    err, peak = traced_peak(lambda: source.encode(item))
    assert isinstance(err, ValueError), err
    assert str(big) in str(err) and "over the limit of 268435456 bytes per item" in str(err)
    assert peak < 2**20
    with pytest.raises(ValueError, match="over the limit of 1000 bytes"):
        source.encode(item, 1000)


def test_an_idx_header_claiming_more_than_the_limit_is_refused_before_inflating(tmp_path):
    """A 64 KB .gz that inflates to 64 MiB under a header claiming 2**30 + 2**20 values."""
    path = tmp_path / "train-images-idx3-ubyte.gz"
    header = bytes([0, 0, 8, 3]) + (1025).to_bytes(4, "big") + (1024).to_bytes(4, "big") + (1024).to_bytes(4, "big")
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header + bytes(64 * 2**20))
    err, peak = traced_peak(lambda: read_idx(str(path)))
    assert isinstance(err, ValueError), err
    assert str(path) in str(err) and "[1025, 1024, 1024] = 1074790400 values, over the limit" in str(err)
    assert peak < 8 * 2**20
