"""The source registry: every source keeps the interface, detection picks by modality, settings reach sources."""
from __future__ import annotations

import pytest

from selfsup.pipeline.media import modality_of_ext
from selfsup.pipeline.sources import SOURCES, SourceOptions, detect_source, make_source
from selfsup.pipeline.sources.fashion_mnist import FashionMNISTSource
from selfsup.pipeline.sources.folder import FolderSource
from selfsup.pipeline.sources.fsdd import FSDDSource
from selfsup.pipeline.sources.moving_fashion_mnist import MovingFashionMNISTSource
from tests.conftest import FMNIST, FSDD, PHOTOS

ROOTS = {"folder": PHOTOS, "fashion-mnist": FMNIST, "fsdd": FSDD, "moving-fashion-mnist": FMNIST}


@pytest.mark.parametrize("kind", sorted(ROOTS))
def test_every_source_encodes_its_natural_modality(kind):
    """Each registered source detects its folder and writes members of the modality it declares."""
    assert SOURCES.names() == sorted(ROOTS)
    cls = SOURCES.get(kind)
    natural = cls.natural_modality
    source = make_source(kind, str(ROOTS[kind]), SourceOptions(natural or "image", labels="auto", subset="test"))
    assert type(source) is cls and cls.detect(str(ROOTS[kind])) and not cls.detect("/nonexistent")
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
    with pytest.raises(ValueError, match="valid: fashion-mnist, folder, fsdd, moving-fashion-mnist"):
        detect_source(str(FMNIST), "image", "mnist")


def test_each_source_reads_only_its_settings():
    """The repr is part of the write job's digest (the shard names): it must stay as it is."""
    opts = SourceOptions("video", labels="auto", subset="test", seed=7)
    assert make_source("folder", "/d", opts) == FolderSource("/d", "video", "folder")
    assert make_source("folder", "/d", SourceOptions("image", labels="none")) == FolderSource("/d", "image", "none")
    assert make_source("fashion-mnist", "/d", opts) == FashionMNISTSource("/d", "test", "auto")
    assert make_source("fsdd", "/d", opts) == FSDDSource("/d", "auto")
    assert make_source("moving-fashion-mnist", "/d", opts) == MovingFashionMNISTSource("/d", "test", "auto", 7)
    assert repr(FashionMNISTSource("/d", "test", "auto")) == "FashionMNISTSource(root='/d', subset='test', labels='auto')"
    assert repr(MovingFashionMNISTSource("/d")) == ("MovingFashionMNISTSource(root='/d', subset='train', labels='auto', "
                                                    "seed=0, frames=16, canvas=64, fps=8)")


def test_a_folder_without_the_modality_suggests_the_one_it_holds():
    with pytest.raises(ValueError, match=r"no audio files .*found \d+ \.jpg files: did you mean --modality image"):
        FolderSource(str(PHOTOS), "audio").items()
