"""`fsdd`: Free Spoken Digit recordings `{digit}_{speaker}_{index}.wav`; label = digit."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import ClassVar, Optional

from selfsup.pipeline.sources.base import (DEFAULT_MAX_ITEM_BYTES, SOURCES, Item, SourceOptions, file_fingerprint,
                                           read_file)

FSDD_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")


@SOURCES.register("fsdd")
@dataclass(frozen=True)
class FSDDSource:
    """Free Spoken Digit recordings; label = digit, speaker and index kept in `.json`."""

    root: str
    labels: str = "auto"

    natural_modality: ClassVar[Optional[str]] = "audio"

    @classmethod
    def from_options(cls, root: str, options: SourceOptions) -> FSDDSource:
        """Reads the labels setting only."""
        return cls(root, labels=options.labels)

    @staticmethod
    def detect(root: str) -> bool:
        """A folder whose WAV files are all named digit_speaker_index.wav."""
        if not os.path.isdir(root):
            return False
        wavs = [f for f in os.listdir(root) if f.endswith(".wav")]
        return bool(wavs) and all(FSDD_NAME.match(f) for f in wavs[:50])

    def items(self) -> tuple[list[Item], list[str]]:
        """One item per recording, sorted by name."""
        keep = self.labels != "none"
        out = []
        for fn in sorted(os.listdir(self.root)):
            m = FSDD_NAME.match(fn)
            if not m:
                continue
            digit, speaker, index = int(m.group(1)), m.group(2), int(m.group(3))
            size, fingerprint = file_fingerprint(os.path.join(self.root, fn))
            out.append(Item(fn[:-4], fn, digit if keep else None,
                            {"speaker": speaker, "index": index, "digit": digit}, size, fingerprint))
        return out, [str(d) for d in range(10)] if keep else []

    def encode(self, item: Item, max_bytes: int = DEFAULT_MAX_ITEM_BYTES) -> dict[str, bytes]:
        """The WAV bytes as they are."""
        return {"wav": read_file(os.path.join(self.root, item.ref), max_bytes)}
