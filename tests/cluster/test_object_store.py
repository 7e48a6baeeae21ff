"""Object store pressure on the multi-node cluster (100 MiB stores, tests/cluster/conftest.py) with
224 px two-view image batches: prefetch stays within its bound, what spills is counted and comes
back intact, and a run reports its data stall and its spill."""
from __future__ import annotations

import re

import numpy as np
import pytest

from selfsup.jobs.cli import main
from selfsup.jobs.cluster.objectstore import StoreTotals
from selfsup.pipeline.batch import FeedSpec
from selfsup.pipeline.feed import BatchFeed
from selfsup.pipeline.snapshot import SourceSpec, build_snapshot
from selfsup.trainers import run_folder as rf
from tests.cluster.conftest import CONFIG, overrides
from tests.conftest import PHOTOS, run_cli

pytestmark = pytest.mark.cluster
BIG = {"size": 224, "channels": 3}  # a two-view micro-batch of 64 is 64 × 2 × 224 × 224 × 3 B = 18.4 MiB
BATCH_BYTES = 64 * 2 * 224 * 224 * 3


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> str:
    dest = str(tmp_path_factory.mktemp("photos") / "ds")
    res = run_cli("shards", "write", str(PHOTOS), dest, "--modality", "image", "--samples-per-shard", "64",
                  "--workers", "1", "--quiet")
    assert res.returncode == 0, res.stderr
    return dest


def ray_memory_stats() -> tuple[int, int]:
    """(MiB spilled, objects spilled) so far, as `ray memory --stats-only` prints them: a second
    reading of the counters, through Ray's own formatting, to check ours against."""
    from ray._private.internal_api import memory_summary

    m = re.search(r"Spilled (\d+) MiB, (\d+) objects", memory_summary(stats_only=True))
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def test_batches_that_overflow_the_stores_spill_counted_and_come_back_intact(multinode, photos):
    import ray

    spec = FeedSpec(build_snapshot([SourceSpec(url=photos)]), 64, modality_args=BIG, seed=11)
    streams, prefetch = 2, 6  # 12 micro-batches ≈ 221 MiB in flight, 6 on each 100 MiB stream-node store
    before, ray_before = StoreTotals.now(), ray_memory_stats()
    assert before is not None and before.capacity_bytes == 5 * 100 * 2**20  # head, 2 stream, 2 trainer nodes
    with BatchFeed(spec, streams=streams, prefetch=prefetch, backend="ray", stream_cpus=0.25,
                   stream_resources={"stream": 1}) as feed:
        feed._fill()  # noqa: SLF001 - ask for every batch the bound allows, and let them all be made
        handles = [r.handle for r in feed._pending]  # noqa: SLF001
        ray.wait(handles, num_returns=len(handles), timeout=600, fetch_local=False)
        spilled = StoreTotals.now()
        assert spilled is not None
        got = [feed.next() for _ in range(len(handles))]
        stats = feed.stats()
    delta, read = spilled.since(before), StoreTotals.now()
    ray_after = ray_memory_stats()
    assert read is not None
    read = read.since(before)
    print(f"\nall made: {delta.describe()}\nall read: {read.describe()}\nfeed: {stats}")
    # prefetch stays within its bound: the stores made the 12 batches asked for and no more
    assert 12 * BATCH_BYTES <= delta.created_bytes <= 12 * BATCH_BYTES + 2**20, delta
    assert delta.spilled_objects >= 2 and delta.spilled_bytes >= 2 * 18 * 2**20  # the overflow went to disk
    assert delta.spilled_objects == ray_after[1] - ray_before[1]  # and is what Ray itself counts
    assert abs(delta.spilled_bytes / 2**20 - (ray_after[0] - ray_before[0])) <= 1
    # (Ray's restore counters lag and batches that went to its filesystem fallback need no restore:
    # what proves they came back is below)
    # what came back from disk is what an inline feed makes: the same samples, the same pixels
    with BatchFeed(spec, backend="inline") as inline:
        want = [inline.next() for _ in range(len(got))]
    for b, w in zip(got, want):
        for name in ("view1", "view2", "key", "position", "valid"):
            np.testing.assert_array_equal(b[name], w[name])


def test_a_run_reports_its_stall_and_what_it_spilled(multinode, photos, moto_s3, capfd):
    run = moto_s3.bucket("runs") + "/pressure"
    streams, prefetch = 2, 4
    args = overrides(run, photos, **{
        "train.steps": 6, "train.ckpt_every": 6, "scaling.num_workers": 1, "data.batch_size": 32,
        "data.modality_args": "{size: 224, channels: 3}", "objective.backbone_args": "{in_channels: 3, width: 8}",
        "data.streams": streams, "data.prefetch": prefetch})
    ray_before = ray_memory_stats()
    assert main(["pretrain", CONFIG, *args, "--address", multinode.address, "--quiet"]) == 0
    ray_after = ray_memory_stats()
    err = capfd.readouterr().err
    status = rf.read_status(run).to_dict()
    store = status["object_store"]
    line = next(s for s in err.splitlines() if "object store: spilled" in s)
    print(f"\n{line}\nstatus.object_store: {store}")
    assert store["capacity_bytes"] == 5 * 100 * 2**20
    assert store["spilled_objects"] == ray_after[1] - ray_before[1]  # counted, whether or not it spilled
    assert f"spilled {store['spilled_bytes'] / 2**20:.0f} MiB in {store['spilled_objects']} object(s)" in line
    metrics = rf.read_metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, 7))
    assert all(0 <= m["stall_pct"] <= 100 for m in metrics)  # the data stall of every logged step
    # what the run made in the stores: at most its 6 steps' batches and the streams × prefetch asked ahead,
    # plus the copy of each batch the trainer read, pulled into its own node's store
    made = 32 * 2 * 224 * 224 * 3
    assert 6 * made <= store["created_bytes"] <= (2 * 6 + streams * prefetch) * made + 8 * 2**20, store
    mean_stall = sum(m["stall_pct"] for m in metrics) / len(metrics)
    assert status["stall_pct"] == pytest.approx(mean_stall)  # the run's stall, in its final status
    assert f"data stall {mean_stall:.1f}%" in err
