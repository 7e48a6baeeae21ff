"""Feeds under faults, each asserting the exact set of delivered samples against a clean run:
stream workers killed again and again across an epoch, and 5xx errors and lost replies injected
between the stream workers and moto S3 (tests/chaos/s3proxy.py); a fault that never heals stops
the feed with an error naming the shard, not a hang."""
from __future__ import annotations

import os
import signal
import time
from typing import Any, Iterator

import numpy as np
import pytest

from selfsup.pipeline.batch import FeedSpec, ShardReadError
from selfsup.pipeline.feed import BatchFeed
from tests.chaos.s3proxy import S3Proxy
from tests.conftest import ARGS, dataset_on_s3

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def on_s3(moto_s3: Any) -> dict[str, Any]:
    """96 images in three shards on moto S3, and a clean inline epoch of them."""
    return dataset_on_s3(moto_s3, "chaos", 96, 3, seed=3)


@pytest.fixture
def proxy(moto_s3: Any) -> Iterator[S3Proxy]:
    with S3Proxy(moto_s3.endpoint) as p:
        yield p


def assert_exactly_the_clean_epoch(got: list[dict[str, Any]], on_s3: dict[str, Any]) -> None:
    delivered = [(s, int(p)) for b in got for s, p, v in zip(b["shard"], b["position"], b["valid"]) if v]
    assert sorted(delivered) == sorted(on_s3["keys"])  # every sample once
    assert len(got) == len(on_s3["clean"])
    for b, want in zip(got, on_s3["clean"]):
        for name in ("view1", "view2", "key", "position", "quarantined"):
            np.testing.assert_array_equal(b[name], want[name])


def test_streams_killed_again_and_again_across_an_epoch(on_s3: dict[str, Any]) -> None:
    import ray

    spec = FeedSpec(on_s3["snapshot"], 8, modality_args=ARGS, seed=3)
    kills, got = 0, []
    with BatchFeed(spec, streams=2, prefetch=2, backend="ray", stream_cpus=0.25, max_deaths=3) as feed:
        for k in range(feed.steps_per_epoch()):
            got.append(feed.next())
            if k % 2 == 0 and k < 10:  # kill a live stream every other step, alternating slots
                handles = feed.stream_handles()
                for slot in ((k // 2) % 2, 1 - (k // 2) % 2):
                    try:  # a stream killed before may not have been replaced yet (the feed does it lazily)
                        pid = ray.get(handles[slot].pid.remote(), timeout=60)
                    except ray.exceptions.RayActorError:
                        continue
                    os.kill(pid, signal.SIGKILL)
                    kills += 1
                    break
        assert feed.restarts >= 3  # kills of streams with requests in flight were noticed and healed
    assert kills >= 3  # (both streams may be dead, not yet replaced, at a kill step)
    assert_exactly_the_clean_epoch(got, on_s3)


def test_5xx_errors_and_lost_replies_between_streams_and_s3_heal(on_s3: dict[str, Any], proxy: S3Proxy) -> None:
    spec = FeedSpec(on_s3["snapshot"], 8, modality_args=ARGS, seed=3,
                    storage_options={"endpoint_url": proxy.endpoint})
    faults = [proxy.fail("GET", ".tar", nth=2, status=503), proxy.fail("GET", ".tar", nth=5, status=500),
              proxy.fail("GET", ".idx", nth=1, status=503), proxy.drop_reply("GET", ".idx", nth=3),
              proxy.drop_reply("GET", ".tar", nth=8)]
    with BatchFeed(spec, streams=2, prefetch=2, backend="ray", stream_cpus=0.25) as feed:
        got = [feed.next() for _ in range(feed.steps_per_epoch())]
    assert [f.fired for f in faults] == [1, 1, 1, 1, 1]
    assert_exactly_the_clean_epoch(got, on_s3)


def test_a_shard_that_keeps_failing_stops_the_feed_naming_it(on_s3: dict[str, Any], proxy: S3Proxy) -> None:
    spec = FeedSpec(on_s3["snapshot"], 8, modality_args=ARGS, seed=3,
                    storage_options={"endpoint_url": proxy.endpoint})
    fault = proxy.fail("GET", "pretrain-000001.tar", nth=0, status=503)
    started = time.monotonic()
    with BatchFeed(spec, streams=1, prefetch=1, backend="local") as feed:
        with pytest.raises(ShardReadError, match=r"pretrain-000001\.tar"):
            for _ in range(feed.steps_per_epoch()):
                feed.next()
    assert fault.fired >= 2 and time.monotonic() - started < 300
