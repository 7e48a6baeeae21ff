"""Epoch plans as properties: one global sequence for any world size, exactly once, equal steps, seeded."""
from __future__ import annotations

import collections
from typing import Optional, Sequence

import numpy as np
import pytest

from selfsup.pipeline.plan import EpochPlan, plan_epoch, rank_batches
from selfsup.pipeline.snapshot import ShardRef, Snapshot

# plan_epoch is lru-cached: reproducibility is checked on the uncached function
plan_uncached = plan_epoch.__wrapped__  # type: ignore[attr-defined]


def snapshot(sizes: dict[str, Sequence[int]], weights: Optional[dict[str, float]] = None) -> Snapshot:
    """A snapshot of made-up shards (never read): per source, one shard per size."""
    refs = [ShardRef(f"s3://made-up/{src}/train-{j:06d}.tar", f"s3://made-up/{src}/train-{j:06d}.idx", n, src)
            for src, ns in sizes.items() for j, n in enumerate(ns)]
    refs.sort(key=lambda r: r.url)
    w = tuple((src, (weights or {}).get(src)) for src in sizes)
    return Snapshot(tuple(refs), w, "image")


def samples_of(plan: EpochPlan, snap: Snapshot, batches: Sequence[int]) -> list[tuple[str, int]]:
    """(shard url, position) of every sample of the given micro-batches, in order."""
    out = []
    for i in batches:
        for shard, lo, hi in plan.batch(i):
            out.extend((snap.shards[shard].url, p) for p in range(lo, hi))
    return out


def all_samples(snap: Snapshot) -> set[tuple[str, int]]:
    return {(s.url, p) for s in snap.shards for p in range(s.n_samples)}


# odd sizes on purpose: an empty shard, a one-sample shard, shards shorter than a run
ONE_SOURCE = snapshot({"a": [137, 50, 64, 13, 0, 1, 100, 91, 77]})
BATCH = 16


def test_every_batch_is_full_and_the_epoch_is_a_permutation_minus_a_short_tail() -> None:
    plan = plan_epoch(ONE_SOURCE, 7, 0, BATCH)
    seq = samples_of(plan, ONE_SOURCE, range(plan.num_batches))
    assert all(sum(hi - lo for _, lo, hi in plan.batch(i)) == BATCH for i in range(plan.num_batches))
    assert (plan.valid == BATCH).all()
    assert len(seq) == len(set(seq)) == plan.num_batches * BATCH
    assert set(seq) <= all_samples(ONE_SOURCE)
    assert ONE_SOURCE.n_samples - len(seq) < BATCH  # only the last partial micro-batch is dropped
    for shard, lo, hi in plan.segments:
        assert 0 <= lo < hi <= ONE_SOURCE.shards[shard].n_samples


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_ranks_take_the_global_sequence_disjoint_equal_and_exactly_once(world: int) -> None:
    plan = plan_epoch(ONE_SOURCE, 7, 0, BATCH)
    steps = plan.steps(world)
    per_rank = [rank_batches(world, r, 0, steps) for r in range(world)]
    assert all(len(b) == steps for b in per_rank)  # every rank takes the same number of steps
    for r, batches in enumerate(per_rank):
        assert batches == [k * world + r for k in range(steps)]
    # interleaving the ranks step by step gives back the global sequence, whatever the world size
    interleaved = [per_rank[r][k] for k in range(steps) for r in range(world)]
    assert interleaved == list(range(steps * world))
    assert 0 <= plan.num_batches - steps * world < world  # dropped tail: fewer than W micro-batches
    rank_samples = [samples_of(plan, ONE_SOURCE, b) for b in per_rank]
    flat = [s for rs in rank_samples for s in rs]
    assert len(flat) == len(set(flat))  # disjoint across ranks, and no repeat within one
    assert set(flat) == set(samples_of(plan, ONE_SOURCE, range(steps * world)))
    missing = all_samples(ONE_SOURCE) - set(flat)
    assert len(missing) == ONE_SOURCE.n_samples - steps * world * BATCH < (world + 1) * BATCH


def test_resuming_on_another_world_size_continues_the_same_sequence() -> None:
    plan = plan_epoch(ONE_SOURCE, 7, 0, BATCH)
    consumed = 3 * 2  # two ranks took 3 steps
    before = [b for r in range(2) for b in rank_batches(2, r, 0, 3)]
    steps = plan.steps(3, consumed)
    after = [b for r in range(3) for b in rank_batches(3, r, consumed, steps)]
    assert sorted(before + after) == list(range(consumed + 3 * steps))
    assert plan.num_batches - (consumed + 3 * steps) < 3
    with pytest.raises(ValueError, match="rank 2 outside world size 2"):
        rank_batches(2, 2, 0, 1)


def test_same_inputs_give_the_same_plan_and_epochs_or_seeds_change_it() -> None:
    a = plan_uncached(ONE_SOURCE, 7, 0, BATCH)
    b = plan_uncached(snapshot({"a": [137, 50, 64, 13, 0, 1, 100, 91, 77]}), 7, 0, BATCH)
    assert np.array_equal(a.segments, b.segments) and np.array_equal(a.offsets, b.offsets)
    seq = samples_of(a, ONE_SOURCE, range(a.num_batches))
    for other in (plan_uncached(ONE_SOURCE, 7, 1, BATCH), plan_uncached(ONE_SOURCE, 8, 0, BATCH)):
        other_seq = samples_of(other, ONE_SOURCE, range(other.num_batches))
        assert other_seq != seq
        assert len(set(other_seq)) == len(other_seq)
        # still a (near) permutation of the same samples, not a different subset
        assert len(set(other_seq) ^ set(seq)) < 2 * BATCH
        assert sum(x == y for x, y in zip(seq, other_seq)) < len(seq) // 4


def test_micro_batches_mix_several_shards() -> None:
    snap = snapshot({"a": [100] * 8})
    mixed = plan_epoch(snap, 0, 0, 32, mix=4)
    single = plan_epoch(snap, 0, 0, 32, mix=1)

    def mean_shards(plan: EpochPlan) -> float:
        return float(np.mean([len({s for s, _, _ in plan.batch(i)}) for i in range(plan.num_batches)]))

    assert mean_shards(mixed) >= 2.0
    assert mean_shards(mixed) <= 5.0  # about `mix` shards: a handful of ranged reads, not one per sample
    assert mean_shards(single) <= 1.5  # the parameter is what mixes them
    # few segments per batch: runs stay contiguous
    assert np.diff(mixed.offsets).max() <= 8


def test_source_weights_three_to_one_hold_overall_and_in_every_prefix() -> None:
    snap = snapshot({"a": [100] * 6, "b": [100] * 6}, weights={"a": 3.0, "b": 1.0})
    plan = plan_epoch(snap, 3, 0, 32)
    source = {s.url: s.source for s in snap.shards}
    seq = [source[url] for url, _ in samples_of(plan, snap, range(plan.num_batches))]
    counts = collections.Counter(seq)
    assert abs(counts["a"] / len(seq) - 0.75) < 0.02
    assert counts["b"] <= 200  # the larger share is not oversampled: b is subsampled to its quota
    for frac in (0.25, 0.5):
        prefix = seq[: int(frac * len(seq))]
        assert abs(prefix.count("a") / len(prefix) - 0.75) < 0.05
    # b's subset changes from epoch to epoch
    b_keys = [{k for k in samples_of(p, snap, range(p.num_batches)) if source[k[0]] == "b"}
              for p in (plan, plan_epoch(snap, 3, 1, 32))]
    assert b_keys[0] != b_keys[1]
    # without weights, sources mix by size and everything is used
    unweighted = snapshot({"a": [100] * 6, "b": [100] * 2})
    p = plan_epoch(unweighted, 3, 0, 32)
    src = {s.url: s.source for s in unweighted.shards}
    c = collections.Counter(src[u] for u, _ in samples_of(p, unweighted, range(p.num_batches)))
    assert c["a"] + c["b"] > 800 - 32 and abs(c["a"] / (c["a"] + c["b"]) - 0.75) < 0.02


def test_eval_plan_covers_every_sample_once_in_order_and_pads_the_last_batch() -> None:
    plan = plan_epoch(ONE_SOURCE, 7, 0, BATCH, train=False)
    total = ONE_SOURCE.n_samples
    assert plan.num_batches == -(-total // BATCH)
    seq = samples_of(plan, ONE_SOURCE, range(plan.num_batches))
    assert seq == [(s.url, p) for s in ONE_SOURCE.shards for p in range(s.n_samples)]
    assert list(plan.valid[:-1]) == [BATCH] * (plan.num_batches - 1)
    assert plan.valid[-1] == total - BATCH * (plan.num_batches - 1) and 0 < plan.valid[-1] < BATCH
    assert sum(hi - lo for _, lo, hi in plan.batch(plan.num_batches - 1)) == plan.valid[-1]
    # an eval plan does not depend on the seed or the epoch
    other = plan_uncached(ONE_SOURCE, 99, 5, BATCH, train=False)
    assert np.array_equal(other.segments, plan.segments)


def test_bad_plan_arguments_raise_naming_the_problem() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        plan_epoch(ONE_SOURCE, 0, 0, 0)
    with pytest.raises(ValueError, match="mix"):
        plan_epoch(ONE_SOURCE, 0, 0, 8, mix=0)
    with pytest.raises(ValueError, match="do not fill one batch"):
        plan_epoch(snapshot({"a": [5, 3]}), 0, 0, 16)
    plan = plan_epoch(ONE_SOURCE, 7, 0, BATCH)
    with pytest.raises(IndexError):
        plan.batch(plan.num_batches)
