"""The streams' shard-index cache: PackedIndex answers as ShardIndex does in far fewer bytes, and
IndexCache keeps within its byte budget, dropping the least recently used index first."""
from __future__ import annotations

import io
import json
import tracemalloc

import numpy as np
import pytest

from selfsup.pipeline.indexcache import IndexCache
from selfsup.pipeline.tarindex import PackedIndex, ShardIndex, index_tar, members_from_range
from tests.conftest import ARGS, add_shard, images, tar_of


def synthetic_index(n: int) -> ShardIndex:
    """An index of n samples with a .jpg and a .cls each (offsets as a tar would give), parsed from JSON."""
    starts = [1024 * i for i in range(n)]
    members = [{"jpg": [s + 512, 300, i], "cls": [s + 1000, 1, 7]} for i, s in enumerate(starts)]
    d = {"format": "selfsup-index/1", "shard": "s.tar", "n_samples": n, "keys": [f"{i:06d}" for i in range(n)],
         "starts": starts, "ends": [s + 1024 for s in starts], "members": members}
    return ShardIndex.from_json(json.dumps(d))


def test_packed_index_answers_every_lookup_as_the_parsed_index():
    rng = np.random.default_rng(0)
    samples = [(f"dir/k{i:03d}-é", {"jpg": rng.bytes(int(rng.integers(1, 900)))} | (
        {"cls": str(i % 3).encode()} if i % 2 else {"json": b"{}", "cls": b"1"})) for i in range(23)]
    data = tar_of(samples)
    index = index_tar(io.BytesIO(data), "x.tar")
    packed = PackedIndex(index)
    assert len(packed) == len(index) == 23 and packed.shard == "x.tar"
    for i in range(len(index)):
        assert packed.keys[i] == index.keys[i]
        assert (packed.starts[i], packed.ends[i]) == (index.starts[i], index.ends[i])
        assert packed.members[i] == dict(index.members[i]) and list(packed.members[i]) == list(index.members[i])
    for lo, hi in [(0, 23), (5, 6), (7, 19)]:
        assert packed.span(lo, hi) == index.span(lo, hi)
        start, end = index.span(lo, hi)
        assert (members_from_range(packed, lo, hi, data[start:end], check_crc=True)
                == members_from_range(index, lo, hi, data[start:end], check_crc=True) == samples[lo:hi])


def traced_bytes(make):
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        value = make()
        return value, tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_packed_index_is_several_times_smaller_and_nbytes_tells_its_size():
    index, parsed = traced_bytes(lambda: synthetic_index(1500))
    packed, held = traced_bytes(lambda: PackedIndex(index))
    assert held * 5 < parsed, (held, parsed)  # the parsed index's Python objects are the bulk
    assert 0.7 * held < packed.nbytes < 1.5 * held, (packed.nbytes, held)


class Blob:
    def __init__(self, key: int, nbytes: int) -> None:
        self.key, self.nbytes = key, nbytes


def test_cache_keeps_within_its_budget_and_drops_the_least_recently_used():
    sizes = {k: 10 + 7 * k for k in range(12)}
    loads: list[int] = []
    cache: IndexCache[Blob] = IndexCache(lambda k: loads.append(k) or Blob(k, sizes[k]), max_bytes=100)
    assert cache(0).key == 0 and cache(1).key == 1 and cache(0).key == 0  # 0 is now the most recent
    assert (cache.hits, cache.misses, loads) == (1, 2, [0, 1])
    cache(10)  # 80 bytes: 10 + 17 + 80 > 100, so the least recent (1) goes, not 0
    assert 0 in cache and 1 not in cache and 10 in cache and cache.nbytes == 90
    rng = np.random.default_rng(1)
    for k in rng.integers(0, 12, 300):
        assert cache(int(k)).key == k
        assert cache.nbytes == sum(sizes[j] for j in range(12) if j in cache) <= 100
    s = cache.stats()
    assert s["hits"] + s["misses"] == 304 and s["evictions"] > 0 and s["misses"] == len(loads)


def test_an_index_over_the_budget_is_returned_but_not_kept_and_a_negative_budget_is_refused():
    cache: IndexCache[Blob] = IndexCache(lambda k: Blob(k, 500), max_bytes=100)
    assert cache(3).key == 3 and len(cache) == 0 and cache.nbytes == 0
    assert cache(3).key == 3 and cache.misses == 2
    with pytest.raises(ValueError, match="-1 bytes"):
        IndexCache(lambda k: Blob(k, 1), max_bytes=-1)


def test_batches_are_the_same_whatever_the_index_budget(tmp_path):
    from selfsup.pipeline.batch import BatchMaker, FeedSpec
    from selfsup.pipeline.snapshot import SourceSpec, build_snapshot

    dest, samples = str(tmp_path / "ds"), images(24, set())
    for k in range(4):
        add_shard(dest, f"pretrain-{k:06d}", samples[6 * k: 6 * (k + 1)], "image")
    spec = FeedSpec(build_snapshot([SourceSpec(url=dest, split="pretrain")]), 8, modality_args=ARGS, seed=3)
    roomy = BatchMaker(spec)
    one = PackedIndex(ShardIndex.from_json((tmp_path / "ds" / "pretrain-000000.idx").read_text())).nbytes
    tight = BatchMaker(FeedSpec(spec.snapshot, 8, modality_args=ARGS, seed=3, index_cache_bytes=one + one // 2))
    for i in range(spec.plan(0).num_batches):
        a, b = roomy.make(0, i), tight.make(0, i)
        assert a.keys() == b.keys()
        for k in a:
            assert np.array_equal(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k], k
        assert len(tight._index) == 1 and tight._index.nbytes <= one + one // 2
    assert len(roomy._index) == 4 and tight._index.evictions > 0
