"""`audio-clips`: sound files of any length cut into short clips, 16 kHz mono FLAC; unlabeled.

For pretraining on general audio (effects, ambience, music) whose files run from a fraction of a
second to minutes. Each file is cut into consecutive BLOCK-second blocks; from each block one
window of a seeded length in [MIN_SECONDS, MAX_SECONDS] at a seeded offset inside the block is
kept (a pure function of (seed, file, block)), so the clips never overlap and cover the file
evenly. A file shorter than BLOCK gives one clip of at most MAX_SECONDS from its start, a final
part shorter than MIN_SECONDS is dropped (unless it is the whole file). Clips are read by seeking
(libsndfile: WAV, FLAC, Ogg Vorbis; others through FFmpeg, whole), mixed to mono and resampled to
RATE. `.json` {path, start, seconds}. Never detected from a folder: name it with
`--source-type audio-clips`.
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from typing import ClassVar, Optional

import numpy as np

from selfsup.pipeline.media import extensions_of
from selfsup.pipeline.seeding import rng_for
from selfsup.pipeline.sources.base import (DEFAULT_MAX_ITEM_BYTES, SOURCES, Item, SourceOptions, file_fingerprint,
                                           read_file, sanitize_key)

BLOCK, MIN_SECONDS, MAX_SECONDS, RATE = 2.0, 1.0, 2.0, 16000
EXTRA_EXTENSIONS = ("oga",)  # Ogg audio as freedesktop sound themes name it


def audio_files(root: str) -> list[str]:
    """Relative paths of the sound files under `root` (recursive, sorted; hidden folders skipped)."""
    wanted = set(extensions_of("audio")) | set(EXTRA_EXTENSIONS)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "_")))
        found += [os.path.relpath(os.path.join(dirpath, f), root) for f in sorted(filenames)
                  if "." in f and f.rsplit(".", 1)[1].lower() in wanted]
    return found


def duration(path: str) -> float:
    """Seconds of audio in the file (header of libsndfile, else FFmpeg's container); 0 when unreadable."""
    import soundfile

    try:
        info = soundfile.info(path)
        return float(info.frames / info.samplerate) if info.samplerate else 0.0
    except (RuntimeError, soundfile.SoundFileError):
        pass
    import av

    try:
        with av.open(path) as container:
            return float(container.duration or 0) / 1e6  # av.time_base: microseconds
    except Exception:  # noqa: BLE001 - FFmpeg raises many types for junk; an unreadable file gives no clips
        return 0.0


def windows(seconds: float, seed: int, name: str) -> list[tuple[float, float]]:
    """(start, length) in seconds of the clips of a file lasting `seconds` (see the module docstring)."""
    if seconds <= 0:
        return []
    if seconds < BLOCK:
        return [(0.0, min(seconds, MAX_SECONDS))]
    out = []
    for b in range(math.ceil(seconds / BLOCK)):
        room = min(BLOCK, seconds - b * BLOCK)
        if room < MIN_SECONDS:
            break
        rng = rng_for("audio-clips", seed, name, b)
        length = float(rng.uniform(MIN_SECONDS, min(MAX_SECONDS, room)))
        out.append((b * BLOCK + float(rng.uniform(0, room - length)), length))
    return out


def read_window(path: str, start: float, length: float, max_bytes: int) -> np.ndarray:
    """float32 [about length * RATE]: mono samples of [start, start + length) at RATE."""
    import soundfile

    from selfsup.pipeline.modalities.audio import decode_audio, resample

    try:
        with soundfile.SoundFile(path) as f:
            f.seek(int(start * f.samplerate))
            x = f.read(int(round(length * f.samplerate)), dtype="float32", always_2d=True)  # [n, C]
            return resample(np.ascontiguousarray(x.mean(axis=1)), f.samplerate, RATE)
    except (RuntimeError, soundfile.SoundFileError):
        pass  # not a libsndfile format: decode the whole file through FFmpeg
    ext = path.rsplit(".", 1)[-1].lower()
    wave = decode_audio(ext, read_file(path, max_bytes), RATE, max_seconds=24 * 3600.0)
    return wave[int(start * RATE): int(start * RATE) + int(round(length * RATE))]


@SOURCES.register("audio-clips")
@dataclass(frozen=True)
class AudioClipsSource:
    """Sound files under a folder cut into short seeded clips (see the module docstring)."""

    root: str
    seed: int = 0

    natural_modality: ClassVar[Optional[str]] = "audio"

    @classmethod
    def from_options(cls, root: str, options: SourceOptions) -> AudioClipsSource:
        """Reads the seed (which places the clips); the clips have no labels."""
        return cls(root, seed=options.seed)

    @staticmethod
    def detect(root: str) -> bool:
        """Never: any folder of sound files is a `folder` source unless this one is named."""
        return False

    def items(self) -> tuple[list[Item], list[str]]:
        """One item per clip (reference: relative path, clip index), files in name order, clips in time order."""
        items = []
        for rel in audio_files(self.root):
            path = os.path.join(self.root, rel)
            _, fingerprint = file_fingerprint(path)
            key = sanitize_key(os.path.splitext(rel)[0])
            for i, (start, length) in enumerate(windows(duration(path), self.seed, rel)):
                items.append(Item(f"{key}-c{i:04d}", (rel, i), None,
                                  {"path": rel, "start": round(start, 4), "seconds": round(length, 4)},
                                  int(length * RATE), f"{fingerprint}-{start:.4f}-{length:.4f}"))
        return items, []

    def encode(self, item: Item, max_bytes: int = DEFAULT_MAX_ITEM_BYTES) -> dict[str, bytes]:
        """The clip as 16-bit mono FLAC at RATE."""
        import soundfile

        rel = item.ref[0]
        wave = read_window(os.path.join(self.root, rel), item.extra["start"], item.extra["seconds"], max_bytes)
        if not len(wave):
            raise ValueError(f"{rel}: no audio at {item.extra['start']} s")
        buf = io.BytesIO()
        soundfile.write(buf, np.clip(wave, -1.0, 1.0), RATE, format="FLAC", subtype="PCM_16")
        return {"flac": buf.getvalue()}
