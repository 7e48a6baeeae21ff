"""The modality interface: decode a sample's members, make its views, describe its token grid.

A modality turns one sample (the tar members sharing a key, as raw bytes) into fixed-shape
numpy arrays. It is constructed from plain keyword arguments (the `data.modality_args` of a
config) and must be a pure function of (members, rng, mode): the batch maker seeds `rng` from
(seed, epoch, shard, key), so any process makes the same arrays.

Per-sample fields (the batch maker stacks them along a new leading batch axis):
- image  train/two-view: view1, view2 uint8 [H, W, C];  single/eval: image uint8 [H, W, C]
         multi-crop (local_crops=K > 0, two-view only): also local uint8 [K, S, S, C] (S = local_size)
- video  train/two-view: view1, view2 uint8 [T, H, W, C];  single/eval: video uint8 [T, H, W, C]
         order: clips uint8 [n, t, H, W, C] (shuffled sub-clips) plus order int64 [] (permutation index)
- audio  logmel two-view: view1, view2 float32 [F, T];  spec/eval-spec: spec float32 [F, T]
         multi-crop (local_crops=K > 0, logmel only): also local float32 [K, F, T_local] (shorter crops)
         wave: wave float32 [S] plus length int64 [] (valid samples before padding)
"""
from __future__ import annotations

from typing import Mapping, Protocol, Sequence

import numpy as np

Sample = dict[str, np.ndarray]


class DecodeError(ValueError):
    """Fully read bytes that do not decode (corrupt, truncated, hostile, or the wrong kind)."""


class Modality(Protocol):
    """What the batch maker needs from a modality."""

    # Read-only, so that plain class attributes (`extensions = ("jpg", "png")`) satisfy them.
    @property
    def name(self) -> str:
        """The registered name ("image")."""

    @property
    def extensions(self) -> tuple[str, ...]:
        """Member extensions holding the media, in order of preference."""

    def decode(self, members: Mapping[str, bytes]) -> object:
        """Decoded media from the sample's members; raises DecodeError on bad bytes.

        Members are bytes, unless the modality sets a class attribute `member_views = True`: then a
        member of pipeline.buffers.MEMBER_VIEW_BYTES or more is a read-only memoryview (read it with
        np.frombuffer or pipeline.buffers.buffer_file; bytes(m) copies it)."""

    def sample(self, decoded: object, rng: np.random.Generator, train: bool) -> Sample:
        """The sample's fixed-shape arrays: augmented views when train, one deterministic view when not."""

    def blank(self, train: bool) -> Sample:
        """Zero arrays with the shapes and dtypes `sample` returns (fills padded eval rows)."""

    def token_grid(self, geometry: Mapping[str, object]) -> tuple[int, ...]:
        """The encoder's token grid for these arrays, given the objective's token geometry.

        Raises ValueError naming both sides when the geometry does not divide the arrays.
        """

    def valid_tokens(self, sample: Sample, geometry: Mapping[str, object]) -> int:
        """How many leading tokens hold real signal (all of them, except for padded audio)."""


def check_decodes(modality: Modality, members: Mapping[str, bytes]) -> None:
    """DecodeError unless the sample's media decodes: the modality's `check` where it has one (a modality
    whose `decode` is lazy, like images', decodes the pixels there), else its `decode`. What writers run."""
    check = getattr(modality, "check", None)
    (check or modality.decode)(members)


def float_pair(value: Sequence[float], name: str) -> tuple[float, float]:
    """A (low, high)-style argument as two floats; raises ValueError naming `name` otherwise."""
    if len(value) != 2:
        raise ValueError(f"{name}={tuple(value)!r} must hold two numbers")
    return float(value[0]), float(value[1])


def media_member(members: Mapping[str, bytes], extensions: tuple[str, ...], modality: str) -> tuple[str, bytes]:
    """The first member whose extension the modality reads, or DecodeError naming what was there."""
    for ext in extensions:
        if ext in members:
            data = members[ext]
            if not data:
                raise DecodeError(f"{modality} member .{ext} is empty (0 bytes)")
            return ext, data
    raise DecodeError(
        f"no {modality} member in sample (has {sorted(members)}; expected one of {list(extensions)})"
    )
