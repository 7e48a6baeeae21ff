"""Stable seeds: every random choice in the data path derives from a blake2b hash of its context.

Python's `hash()` is salted per process, so it is never used: the same (seed, epoch, shard, key)
gives the same views on any actor, rank or machine.
"""
from __future__ import annotations

import hashlib

import numpy as np


def stable_hash(*parts: object) -> int:
    """A 64-bit integer from the parts' text, identical in every process and on every machine."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        h.update(repr(part).encode("utf-8"))
        h.update(b"\x1f")  # separator, so ("ab", "c") != ("a", "bc")
    return int.from_bytes(h.digest(), "little")


def rng_for(*parts: object) -> np.random.Generator:
    """A numpy Generator (Philox, platform-independent) seeded from the parts."""
    return np.random.Generator(np.random.Philox(key=stable_hash(*parts)))


def sample_rng(seed: int, epoch: int, shard: str, key: str, *extra: object) -> np.random.Generator:
    """The generator for one sample's augmentation and masking choices."""
    return rng_for("sample", int(seed), int(epoch), shard, key, *extra)
