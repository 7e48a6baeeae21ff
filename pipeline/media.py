"""The media file extensions of each modality: the one list that sources, modalities and tools read.

A folder source picks files by these extensions, and a modality looks for a sample's media among
tar members with them, in this order of preference.
"""
from __future__ import annotations

from typing import Optional

EXTENSIONS: dict[str, tuple[str, ...]] = {
    "image": ("jpg", "jpeg", "png", "webp", "bmp"),
    "audio": ("wav", "flac", "mp3", "ogg", "m4a", "opus"),
    "video": ("mp4", "avi", "mkv", "webm", "mov", "m4v"),
}


def extensions_of(modality: str) -> tuple[str, ...]:
    """The media extensions of `modality`; ValueError naming the known modalities otherwise."""
    try:
        return EXTENSIONS[modality]
    except KeyError:
        raise ValueError(f"no media extensions for modality {modality!r}; "
                         f"known: {', '.join(sorted(EXTENSIONS))}") from None


def modality_of_ext(ext: str) -> Optional[str]:
    """Which modality a file extension (with or without its dot, any case) belongs to, if any."""
    ext = ext.lower().lstrip(".")
    return next((m for m, exts in EXTENSIONS.items() if ext in exts), None)
