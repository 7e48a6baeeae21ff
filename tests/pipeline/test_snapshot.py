"""Snapshot sample ids (Exemplar-CNN's surrogate classes) and labeled sources (S4L) on tiny real shards."""
from __future__ import annotations

import pytest

from selfsup.pipeline.batch import BatchMaker, FeedSpec, check_targets
from selfsup.pipeline.plan import rank_batches
from selfsup.pipeline.snapshot import SourceSpec, Snapshot, build_snapshot, load_snapshot, save_snapshot
from selfsup.pipeline.tarindex import decode_label, load_index, read_samples

ARGS = {"size": 28, "channels": 1, "recipe": "simclr"}


def two_sources(data: str, weights: tuple[float, float] = (0.6, 0.4)) -> Snapshot:
    """The tiny Fashion-MNIST data as an unlabeled pretrain source (32) and a labeled probe-train one (20)."""
    return build_snapshot([SourceSpec(data, "pretrain", weights[0]),
                           SourceSpec(data, "probe-train", weights[1], target="cls")], "image")


def epoch_rows(snap: Snapshot, batches: list[int], batch_size: int = 5) -> dict[int, list[tuple]]:
    """Micro-batch i → its rows as (shard URL, position, key, sample_id, label)."""
    maker = BatchMaker(FeedSpec(snap, batch_size, ARGS, seed=3))
    out = {}
    for i in batches:
        b = maker.make(0, i)
        out[i] = list(zip(b["shard"].tolist(), b["position"].tolist(), b["key"].tolist(),
                          b["sample_id"].tolist(), b["label"].tolist()))
    return out


def test_sample_ids_are_snapshot_ordinals_unique_and_the_same_on_any_world_size_and_resume(
        tiny_fmnist: str, tmp_path) -> None:
    snap = two_sources(tiny_fmnist)
    n = FeedSpec(snap, 5, ARGS, seed=3).plan(0).num_batches
    one = epoch_rows(snap, rank_batches(1, 0, 0, n))
    rows = [r for i in sorted(one) for r in one[i]]
    first = {}  # the ordinal of each shard's first sample, counted independently over the URL-sorted shards
    for s in sorted(snap.shards, key=lambda s: s.url):
        first[s.url] = sum(t.n_samples for t in snap.shards if t.url < s.url)
    assert [r[3] for r in rows] == [first[url] + pos for url, pos, *_ in rows]
    assert len({r[3] for r in rows}) == len(rows) == n * 5  # unique across the epoch
    assert all(0 <= r[3] < snap.n_samples for r in rows)

    save_snapshot(snap, str(tmp_path))  # a resume on 2 ranks from data position 4, from the saved snapshot
    resumed = load_snapshot(str(tmp_path))
    assert resumed == snap and resumed.digest() == snap.digest()
    steps = (n - 4) // 2
    two = epoch_rows(resumed, rank_batches(2, 0, 4, steps) + rank_batches(2, 1, 4, steps))
    assert two == {i: one[i] for i in two} and len(two) == 2 * steps


def test_labeled_source_rows_carry_their_label_at_its_weight_and_others_minus_one(tiny_fmnist: str) -> None:
    snap = two_sources(tiny_fmnist, (0.6, 0.4))
    labeled = {s.url for j, s in enumerate(snap.shards) if snap.target_of(j) == "cls"}
    assert labeled == {s.url for s in snap.shards if s.source.endswith("#probe-train")}
    truth = {(s.url, key): decode_label(m["cls"]) for s in snap.shards if s.url in labeled
             for key, m in read_samples(s.url, load_index(s.index_url), 0, s.n_samples)}
    n = FeedSpec(snap, 5, ARGS, seed=3).plan(0).num_batches
    rows = [r for b in epoch_rows(snap, list(range(n))).values() for r in b]
    for url, _, key, _, label in rows:
        assert label == (truth[(url, key)] if url in labeled else -1), (url, key)
    assert sum(r[4] >= 0 for r in rows) / len(rows) == pytest.approx(0.4, abs=0.02)  # 20 of the 50-sample epoch


def test_targets_are_validated_recorded_in_the_digest_and_a_missing_key_is_named(tiny_fmnist: str) -> None:
    with pytest.raises(ValueError, match="target=''"):
        SourceSpec(tiny_fmnist, "probe-train", target="")
    plain = build_snapshot([SourceSpec(tiny_fmnist, "pretrain"), SourceSpec(tiny_fmnist, "probe-train")], "image")
    assert plain.targets == () and two_sources(tiny_fmnist).digest() != build_snapshot(
        [SourceSpec(tiny_fmnist, "pretrain", 0.6), SourceSpec(tiny_fmnist, "probe-train", 0.4)], "image").digest()
    check_targets(two_sources(tiny_fmnist))  # probe-train samples carry .cls
    for split, target in (("probe-train", "speaker"), ("pretrain", "cls")):  # no such key / an unlabeled split
        snap = build_snapshot([SourceSpec(tiny_fmnist, split, target=target)], "image")
        with pytest.raises(ValueError, match=f"target {target!r} is not in its sample"):
            check_targets(snap)
