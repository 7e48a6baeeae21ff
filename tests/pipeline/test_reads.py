"""A batch maker's segment reads on a thread pool (pipeline/reads.py): several ranged reads in flight
and overlapping decode on a real S3 API (moto), none with one read at a time; a failed read names its
shard and leaves no thread behind."""
from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

import pytest

from selfsup.pipeline.batch import BatchMaker, FeedSpec, ShardReadError
from selfsup.pipeline.reads import READ_THREAD
from selfsup.pipeline.snapshot import SourceSpec, build_snapshot
from tests.conftest import ARGS, add_shard, images


def four_shards(dest: str) -> FeedSpec:
    """32 Fashion-MNIST JPEGs in 4 shards; batches of 8 mixing all 4 (one ranged read each), one at a time."""
    samples = images(32, set())
    for k in range(4):
        add_shard(dest, f"pretrain-{k:06d}", samples[8 * k: 8 * (k + 1)], "image")
    return FeedSpec(build_snapshot([SourceSpec(url=dest, split="pretrain")]), 8, ARGS, seed=1, mix=4,
                    read_concurrency=1)


def read_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(READ_THREAD)]


def test_pooled_reads_are_in_flight_together_and_overlap_decode_on_s3(moto_s3: Any) -> None:
    spec = four_shards(moto_s3.bucket("reads") + "/ds")
    serial, pooled = BatchMaker(spec), BatchMaker(dataclasses.replace(spec, read_concurrency=2))
    for i in range(spec.plan(0).num_batches):
        one, two = serial.make(0, i), pooled.make(0, i)
        assert one["view1"].tobytes() == two["view1"].tobytes() and one["view2"].tobytes() == two["view2"].tobytes()
    one_s, two_s = serial.reads.stats(), pooled.reads.stats()
    assert one_s["reads"] == two_s["reads"] >= 8 and one_s["bytes"] == two_s["bytes"]
    assert one_s["max_in_flight"] == 1 and one_s["overlapped_decode"] == 0
    assert two_s["max_in_flight"] == 2 and two_s["overlapped_decode"] > 0, two_s
    assert not read_threads()
    assert BatchMaker(dataclasses.replace(spec, read_concurrency=None)).read_concurrency == spec.mix == 4


def test_local_shards_are_read_in_the_calling_thread_unless_told(tmp_path: Any,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    spec = dataclasses.replace(four_shards(str(tmp_path / "ds")), read_concurrency=None)
    default, told = BatchMaker(spec), BatchMaker(dataclasses.replace(spec, read_concurrency=3))
    assert default.read_concurrency == 1 and told.read_concurrency == 3
    started: list[str] = []
    real = threading.Thread.start

    def start(self: threading.Thread) -> None:
        started.append(self.name)
        real(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    n = spec.plan(0).num_batches
    local = [default.make(0, i) for i in range(n)]
    assert started == [] and default.reads.stats()["max_in_flight"] == 1  # no pool, no thread
    pooled = [told.make(0, i) for i in range(n)]
    assert started and all(name.startswith(READ_THREAD) for name in started)
    assert told.reads.stats()["max_in_flight"] > 1
    assert [b["view1"].tobytes() for b in local] == [b["view1"].tobytes() for b in pooled]


def test_a_shard_deleted_after_the_snapshot_raises_naming_it_and_leaves_no_read_thread(tmp_path: Any) -> None:
    import cv2

    spec = dataclasses.replace(four_shards(str(tmp_path / "ds")), read_concurrency=4)
    maker = BatchMaker(spec)
    os.remove(tmp_path / "ds" / "pretrain-000002.tar")  # its index stays: the read itself fails
    plan, gone = spec.plan(0), next(j for j, s in enumerate(spec.snapshot.shards) if s.url.endswith("-000002.tar"))
    i = next(i for i in range(plan.num_batches) if len(plan.batch(i)) >= 4 and gone in [s for s, _, _ in plan.batch(i)])
    with pytest.raises(ShardReadError, match="pretrain-000002.tar"):
        maker.make(0, i)
    assert not read_threads() and cv2.getNumThreads() == 1
    assert maker.reads.in_flight == 0 and 1 <= maker.reads.stats()["reads"] <= len(plan.batch(i))
