"""Epoch plans: the global sequence of micro-batches, a pure function of (snapshot, seed, epoch, batch size).

Nothing here depends on the world size or on the number of streams. Rank r of W takes
micro-batch k·W + r at step k (counted from the data position), and the tail that does not
fill W micro-batches is dropped, so every rank takes the same number of steps.

How a training epoch is built:
1. each shard is cut into runs of `run_length` contiguous samples, at a boundary offset drawn
   per (seed, epoch, shard), and its runs are put in a random order;
2. with source weights, each source contributes runs up to its share of the epoch (larger
   sources are subsampled, a different subset every epoch); without, everything is used;
3. per source, runs are interleaved round-robin over a window of `mix` shards (shards enter the
   window in a random order), and sources are merged so that every prefix keeps their weights;
4. the run sequence is cut into micro-batches of `batch_size` samples; the last partial one is dropped.
Each micro-batch is thus a few contiguous runs from about `mix` shards: a handful of ranged reads.

Eval plans walk the shards in order and pad the last batch (padding rows are flagged invalid).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from selfsup.pipeline.seeding import rng_for
from selfsup.pipeline.snapshot import Snapshot

Segment = tuple[int, int, int]  # (shard index in the snapshot, first sample, end sample)


@dataclass(frozen=True)
class EpochPlan:
    """Micro-batches as segments in CSR form: batch i is segments[offsets[i]:offsets[i+1]]."""

    epoch: int
    batch_size: int
    segments: np.ndarray  # [S, 3] int64: shard, lo, hi
    offsets: np.ndarray   # [num_batches + 1] int64
    valid: np.ndarray     # [num_batches] int64: real samples per batch (eval pads the last one)

    @property
    def num_batches(self) -> int:
        return len(self.offsets) - 1

    def batch(self, i: int) -> list[Segment]:
        """The segments of micro-batch i."""
        if not 0 <= i < self.num_batches:
            raise IndexError(f"micro-batch {i} out of range: epoch {self.epoch} has {self.num_batches}")
        rows = self.segments[self.offsets[i]: self.offsets[i + 1]]
        return [(int(s), int(lo), int(hi)) for s, lo, hi in rows]

    def steps(self, world: int, consumed: int = 0) -> int:
        """Steps each of `world` ranks takes from data position `consumed` to the end of the epoch."""
        return max(0, (self.num_batches - consumed) // world)


def rank_batches(world: int, rank: int, consumed: int, steps: int) -> list[int]:
    """Global micro-batch indices rank `rank` takes for `steps` steps from position `consumed`."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world}")
    return [consumed + k * world + rank for k in range(steps)]


def _shard_runs(n: int, run_length: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Runs [lo, hi) covering 0..n, cut at a random offset, in a random order."""
    offset = int(rng.integers(0, min(run_length, n))) if n > 1 else 0
    cuts = sorted({0, n, *range(offset, n, run_length)})
    runs = [(cuts[j], cuts[j + 1]) for j in range(len(cuts) - 1)]
    return [runs[j] for j in rng.permutation(len(runs))]


def _quotas(snapshot: Snapshot) -> dict[str, int]:
    """Samples each source contributes this epoch (all of them unless weights are set)."""
    sizes: dict[str, int] = {}
    for s in snapshot.shards:
        sizes[s.source] = sizes.get(s.source, 0) + s.n_samples
    weights = {name: w for name, w in snapshot.weights if name in sizes}
    if not weights or any(w is None for w in weights.values()):
        return sizes
    total_w = sum(weights.values())  # type: ignore[arg-type]
    share = {k: w / total_w for k, w in weights.items()}  # type: ignore[operator]
    epoch_size = min(sizes[k] / share[k] for k in sizes)
    return {k: min(sizes[k], int(math.floor(share[k] * epoch_size + 1e-9))) for k in sizes}


def _interleave(shard_runs: list[tuple[int, list[tuple[int, int]]]], mix: int) -> list[Segment]:
    """Round-robin over a window of `mix` shards; a finished shard makes room for the next."""
    queue = list(shard_runs)
    window: list[tuple[int, list[tuple[int, int]]]] = []
    out: list[Segment] = []
    while queue or window:
        while len(window) < mix and queue:
            shard, runs = queue.pop(0)
            window.append((shard, list(runs)))
        for shard, runs in list(window):
            lo, hi = runs.pop(0)
            out.append((shard, lo, hi))
        window = [(s, r) for s, r in window if r]
    return out


def _merge_sources(streams: dict[str, list[Segment]], quotas: dict[str, int]) -> list[Segment]:
    """Merge per-source run sequences so every prefix keeps the sources' proportions."""
    pos = {k: 0 for k in streams}
    taken = {k: 0 for k in streams}
    out: list[Segment] = []
    while True:
        live = [k for k in sorted(streams) if pos[k] < len(streams[k])]
        if not live:
            return out
        k = min(live, key=lambda name: (taken[name] / max(1, quotas[name]), name))
        seg = streams[k][pos[k]]
        pos[k] += 1
        taken[k] += seg[2] - seg[1]
        out.append(seg)


def _cut(runs: list[Segment], batch_size: int, pad_last: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut a run sequence into micro-batches of batch_size samples (segments split at borders)."""
    segments: list[Segment] = []
    offsets = [0]
    valid: list[int] = []
    fill = 0
    for shard, lo, hi in runs:
        while lo < hi:
            take = min(hi - lo, batch_size - fill)
            segments.append((shard, lo, lo + take))
            lo += take
            fill += take
            if fill == batch_size:
                offsets.append(len(segments))
                valid.append(batch_size)
                fill = 0
    if fill:
        if pad_last:
            offsets.append(len(segments))
            valid.append(fill)
        else:
            del segments[offsets[-1]:]
    seg = np.asarray(segments, dtype=np.int64).reshape(-1, 3)
    return seg, np.asarray(offsets, dtype=np.int64), np.asarray(valid, dtype=np.int64)


@functools.lru_cache(maxsize=8)
def plan_epoch(snapshot: Snapshot, seed: int, epoch: int, batch_size: int, mix: int = 4,
               run_length: Optional[int] = None, train: bool = True) -> EpochPlan:
    """The epoch's global micro-batch sequence (see the module docstring)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if mix < 1:
        raise ValueError(f"mix (shards per micro-batch) must be at least 1, got {mix}")
    if not train:
        runs = [(i, 0, s.n_samples) for i, s in enumerate(snapshot.shards) if s.n_samples]
        return EpochPlan(epoch, batch_size, *_cut(runs, batch_size, pad_last=True))
    length = run_length or max(1, math.ceil(batch_size / mix))
    quotas = _quotas(snapshot)
    per_source: dict[str, list[tuple[int, list[tuple[int, int]]]]] = {}
    for i, s in enumerate(snapshot.shards):
        if s.n_samples:
            cuts = _shard_runs(s.n_samples, length, rng_for("runs", seed, epoch, s.url))
            per_source.setdefault(s.source, []).append((i, cuts))
    streams = {}
    for source, shard_runs in per_source.items():
        shard_runs = _take_quota(shard_runs, quotas[source], rng_for("quota", seed, epoch, source))
        order = rng_for("shard-order", seed, epoch, source).permutation(len(shard_runs))
        streams[source] = _interleave([shard_runs[j] for j in order], mix)
    runs = _merge_sources(streams, quotas)
    plan = EpochPlan(epoch, batch_size, *_cut(runs, batch_size, pad_last=False))
    if plan.num_batches == 0:
        raise ValueError(f"the snapshot's {snapshot.n_samples} samples do not fill one batch of {batch_size}")
    return plan


def _take_quota(shard_runs: list[tuple[int, list[tuple[int, int]]]], quota: int,
                rng: np.random.Generator) -> list[tuple[int, list[tuple[int, int]]]]:
    """Keep runs (chosen at random across shards) up to `quota` samples, trimming the last one."""
    total = sum(hi - lo for _, runs in shard_runs for lo, hi in runs)
    if quota >= total:
        return shard_runs
    flat = [(j, r) for j, (_, runs) in enumerate(shard_runs) for r in range(len(runs))]
    keep: dict[int, set[int]] = {}
    trimmed: dict[tuple[int, int], tuple[int, int]] = {}
    left = quota
    for idx in rng.permutation(len(flat)):
        if left <= 0:
            break
        j, r = flat[idx]
        lo, hi = shard_runs[j][1][r]
        if hi - lo > left:
            trimmed[(j, r)] = (lo, lo + left)
        left -= min(hi - lo, left)
        keep.setdefault(j, set()).add(r)
    out = []
    for j, (shard, runs) in enumerate(shard_runs):
        kept = [trimmed.get((j, r), runs[r]) for r in range(len(runs)) if r in keep.get(j, ())]
        if kept:
            out.append((shard, kept))
    return out
