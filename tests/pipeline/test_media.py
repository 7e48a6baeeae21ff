"""One list of media extensions: modalities and sources read the same tuples."""
from __future__ import annotations

import pytest

from selfsup.pipeline.media import EXTENSIONS, extensions_of, modality_of_ext
from selfsup.pipeline.modalities import MODALITIES


def test_modalities_read_the_media_list():
    builtin = [n for n in MODALITIES if MODALITIES.get(n).__module__.startswith("selfsup.pipeline.modalities.")]
    assert builtin == sorted(EXTENSIONS)  # (tests may register their own, e.g. tests/chaos/poison.py)
    for name in builtin:
        assert MODALITIES.get(name).extensions is EXTENSIONS[name]


def test_every_extension_belongs_to_one_modality():
    for modality, exts in EXTENSIONS.items():
        for ext in exts:
            assert modality_of_ext(ext) == modality_of_ext("." + ext.upper()) == modality
    assert modality_of_ext("txt") is None
    with pytest.raises(ValueError, match="known: audio, image, video"):
        extensions_of("text")
