"""Sources that `selfsup shards write` turns into shards, registered by name.

Importing this package registers every one of them (one module each):

- `folder`: media files found recursively; label from the parent folder name or a regex
- `fashion-mnist`: the four IDX files (gzip or not) of Fashion-MNIST / MNIST; `--subset train|test`
- `fsdd`: Free Spoken Digit recordings `{digit}_{speaker}_{index}.wav`; label = digit
- `moving-fashion-mnist`: clips of one Fashion-MNIST item moving across a canvas
- `soundfont`: notes rendered from a SoundFont 2 file's General MIDI presets; label = GM family;
  `--subset train|test|all` splits by note
- `audio-clips`: sound files of any length cut into seeded 1-2 s clips (named only, never detected)

A source is detected from the SOURCE folder or named with `--source-type`. To add one, write a
module here with a frozen dataclass that satisfies `Source` (base.py), decorate it with
`@SOURCES.register("name")` and import the module here.
"""
from __future__ import annotations

from typing import Optional

from selfsup.pipeline.sources import (audio_clips, fashion_mnist, folder, fsdd,  # noqa: F401  (they register)
                                     moving_fashion_mnist, soundfont)
from selfsup.pipeline.sources.base import (DEFAULT_MAX_ITEM_BYTES, SOURCES, Item, KeyReport, Source, SourceOptions,
                                           apply_filters, item_name, sanitize_key, unique_keys, with_label)

FALLBACK = "folder"  # any folder is one; chosen when no other source recognizes the path


def detect_source(root: str, modality: str, source_type: Optional[str] = None) -> str:
    """The source type for the folder `root`: the one named, else the best that recognizes it.

    Among the sources that recognize `root`, one whose natural modality is `modality` wins (a
    Fashion-MNIST folder is `moving-fashion-mnist` for video); else the first by name, whose
    modality then differs and makes the caller say which `--modality` to use; else `folder`.
    """
    if source_type:
        SOURCES.get(source_type)
        return source_type
    found = [name for name in SOURCES if name != FALLBACK and SOURCES.get(name).detect(root)]
    return next((n for n in found if SOURCES.get(n).natural_modality == modality), found[0] if found else FALLBACK)


def make_source(kind: str, root: str, options: SourceOptions) -> Source:
    """The source registered as `kind`, reading the folder `root` with these settings."""
    return SOURCES.get(kind).from_options(root, options)


__all__ = ["DEFAULT_MAX_ITEM_BYTES", "SOURCES", "Item", "KeyReport", "Source", "SourceOptions", "apply_filters",
           "detect_source", "item_name", "make_source", "sanitize_key", "unique_keys", "with_label"]
