"""BatchFeed on a real local Ray cluster and shards on S3 (moto): exactly once, recovery, resume, quarantine."""
from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
import pytest

from selfsup.pipeline import storage
from selfsup.pipeline.batch import FeedSpec, SampleDecodeError
from selfsup.pipeline.feed import BatchFeed
from selfsup.pipeline.snapshot import SourceSpec, build_snapshot
from selfsup.pipeline.sources.fashion_mnist import fmnist_arrays
from tests.conftest import ARGS, FMNIST, add_shard, jpeg, planned_keys, run_cli, shard_keys

BATCH = 28  # 600 samples → 21 micro-batches (12 samples dropped); two ranks → 10 steps, one batch dropped
ARRAYS = ("view1", "view2")
pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def fmnist(moto_s3: Any) -> dict[str, Any]:
    """600 Fashion-MNIST images in 6 shards on S3, their snapshot, and (shard url, position) → key."""
    dest = moto_s3.bucket("feed") + "/fm"
    res = run_cli("shards", "write", str(FMNIST), dest, "--modality", "image", "--limit", "600",
                  "--samples-per-shard", "100", "--workers", "1", "--quiet")
    assert res.returncode == 0, res.stderr
    snap = build_snapshot([SourceSpec(url=dest, split="pretrain")])
    assert len(snap.shards) == 6 and snap.n_samples == 600
    return {"snapshot": snap, "keys": shard_keys(snap)}


@pytest.fixture(scope="module")
def spec(fmnist: dict[str, Any]) -> FeedSpec:
    return FeedSpec(fmnist["snapshot"], BATCH, modality_args=ARGS, seed=5)


@pytest.fixture(scope="module")
def reference(spec: FeedSpec) -> list[dict[str, Any]]:
    """Epoch 0 taken uninterrupted by one rank from two Ray streams."""
    with BatchFeed(spec, 0, 1, streams=2, prefetch=2, backend="ray", stream_cpus=0.25) as feed:
        assert feed.steps_per_epoch() == 21
        return [feed.next() for _ in range(21)]


def assert_same_batch(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Byte-identical arrays and the same keys, positions and index."""
    for name in (*ARRAYS, "key", "shard", "position", "quarantined", "valid"):
        assert np.array_equal(got[name], want[name]), name
    assert got["view1"].dtype == want["view1"].dtype and int(got["index"]) == int(want["index"])


def run_ranks(feeds: Sequence[BatchFeed], steps: int, kill_at: int = -1) -> list[list[dict[str, Any]]]:
    """Step every rank in lock step; at step `kill_at`, kill rank 0's first stream actor."""
    import ray

    out: list[list[dict[str, Any]]] = [[] for _ in feeds]
    for k in range(steps):
        if k == kill_at:
            ray.kill(feeds[0].stream_handles()[0], no_restart=True)
        for r, feed in enumerate(feeds):
            out[r].append(feed.next())
    return out


def test_a_stream_no_node_can_take_is_named_while_its_request_waits(spec: FeedSpec, monkeypatch: Any,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Ray waits without a word for a node that can take an actor: the feed's wait says so, naming what the
    stream asks for and what the live nodes offer, and ends when the request does."""
    import threading
    import time

    import ray
    from selfsup.pipeline import workers
    from selfsup.pipeline.stream import start_stream

    monkeypatch.setattr(workers, "STALL_WARN_S", 0.2)
    monkeypatch.setattr(workers, "STALL_REPEAT_S", 0.2)
    nodes = workers.RayNodes()
    asks = {"CPU": 0.25, "gpu-stream-node": 1.0}
    handle, node_ref = nodes.started(start_stream(spec, 0.25, {"gpu-stream-node": 1.0}))
    ended: list[BaseException] = []

    def get() -> None:
        try:
            nodes.get(handle.keys.remote(0, 0), "micro-batch 0", node_ref, asks)
        except BaseException as e:  # noqa: BLE001 - the kill below ends it with Ray's death, which the feed judges
            ended.append(e)

    waiter = threading.Thread(target=get)
    with caplog.at_level("WARNING", logger="selfsup.pipeline.workers"):
        waiter.start()
        deadline = time.monotonic() + 30
        while len(caplog.records) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        workers.kill(handle)  # the request fails: the wait ends (the feed then judges the death)
        waiter.join(30)
    assert not waiter.is_alive() and len(ended) == 1 and isinstance(ended[0], workers.ray_deaths())
    said = [r.getMessage() for r in caplog.records]
    assert len(said) >= 2 and "micro-batch 0: no answer after" in said[0]
    assert "has not started" in said[0] and "gpu-stream-node: 0" in said[0] and "ray status" in said[0]
    assert "data.stream_resources" in said[0]  # the setting that asked for it

    with BatchFeed(spec, streams=1, prefetch=1, backend="ray", stream_cpus=0.25) as feed:  # a started stream
        feed.next()
        node = ray.get(feed._node_refs[0])  # noqa: SLF001
        assert f"runs on node {node[:12]} and is still making it" in workers.RayNodes.stall_note(
            feed._node_refs[0], {"CPU": 0.25}, "data.stream_cpus")  # noqa: SLF001


@pytest.mark.parametrize("kill", [False, True], ids=["plain", "stream-killed"])
def test_two_ranks_take_every_key_once_even_when_a_stream_dies(spec: FeedSpec, fmnist: dict[str, Any],
                                                                reference: list[dict[str, Any]], kill: bool) -> None:
    feeds = [BatchFeed(spec, r, 2, streams=2, prefetch=2, backend="ray", stream_cpus=0.25) for r in range(2)]
    try:
        steps = feeds[0].steps_per_epoch()
        assert steps == feeds[1].steps_per_epoch() == 10
        before = feeds[0].stream_handles()[0]
        got = run_ranks(feeds, steps, kill_at=4 if kill else -1)
        per_rank = [[str(k) for b in batches for k in b["key"]] for batches in got]
        for r, batches in enumerate(got):
            for k, b in enumerate(batches):
                assert (int(b["epoch"]), int(b["index"])) == (0, 2 * k + r)
                assert list(b["key"]) == planned_keys(spec, fmnist["keys"], 0, 2 * k + r)
                assert_same_batch(b, reference[2 * k + r])  # the same bytes as one rank gets
                assert b["view1"].shape == (BATCH, 28, 28, 1) and b["view1"].dtype == np.uint8
        assert not set(per_rank[0]) & set(per_rank[1])
        union = per_rank[0] + per_rank[1]
        assert len(union) == len(set(union)) == 2 * steps * BATCH
        dropped = set(fmnist["keys"].values()) - set(union)
        assert len(dropped) == 600 - 2 * steps * BATCH < 2 * BATCH
        assert [f.state_dict() for f in feeds] == [{"epoch": 0, "consumed": 20}] * 2
        assert feeds[0].steps_left_in_epoch() == 0
        restarts = feeds[0].stats()["restarts"]
        if kill:
            assert restarts >= 1 and feeds[0].stream_handles()[0] != before
        else:
            assert restarts == 0
        assert feeds[1].stats()["restarts"] == 0
        nxt = [f.next() for f in feeds]  # the next epoch starts at its first micro-batches
        assert [(int(b["epoch"]), int(b["index"])) for b in nxt] == [(1, 0), (1, 1)]
    finally:
        for f in feeds:
            f.close()


def test_resume_from_state_dict_gives_the_same_remaining_bytes(spec: FeedSpec,
                                                               reference: list[dict[str, Any]]) -> None:
    with BatchFeed(spec, 0, 1, streams=2, prefetch=2, backend="ray", stream_cpus=0.25) as feed:
        first = [feed.next() for _ in range(7)]
        state = feed.state_dict()
    assert state == {"epoch": 0, "consumed": 7}
    for b, ref in zip(first, reference):
        assert_same_batch(b, ref)
    with BatchFeed(spec, 0, 1, streams=1, prefetch=3, backend="ray", stream_cpus=0.25) as feed:
        feed.load_state_dict(state)
        assert feed.steps_left_in_epoch() == 14
        rest = [feed.next() for _ in range(14)]
        assert feed.state_dict() == {"epoch": 0, "consumed": 21}
    for b, ref in zip(rest, reference[7:]):
        assert_same_batch(b, ref)


def test_two_ranks_resume_as_one_from_the_global_position(spec: FeedSpec, fmnist: dict[str, Any],
                                                          reference: list[dict[str, Any]]) -> None:
    feeds = [BatchFeed(spec, r, 2, streams=1, prefetch=2, backend="ray", stream_cpus=0.25) for r in range(2)]
    try:
        before = run_ranks(feeds, 4)
        states = [f.state_dict() for f in feeds]
    finally:
        for f in feeds:
            f.close()
    assert states == [{"epoch": 0, "consumed": 8}] * 2  # consumed counts global micro-batches
    with BatchFeed(spec, 0, 1, streams=2, prefetch=2, backend="ray", stream_cpus=0.25) as feed:
        feed.load_state_dict(states[0])
        steps = feed.steps_left_in_epoch()
        assert steps == 13
        after = [feed.next() for _ in range(steps)]
    for b, ref in zip(after, reference[8:]):
        assert_same_batch(b, ref)
    keys_before = [str(k) for batches in before for b in batches for k in b["key"]]
    keys_after = [str(k) for b in after for k in b["key"]]
    assert not set(keys_before) & set(keys_after)
    everything = keys_before + keys_after
    assert len(everything) == len(set(everything)) == 21 * BATCH
    assert set(everything) == {k for i in range(21) for k in planned_keys(spec, fmnist["keys"], 0, i)}


def test_local_and_inline_backends_make_the_same_bytes_as_ray(spec: FeedSpec,
                                                              reference: list[dict[str, Any]]) -> None:
    with BatchFeed(spec, 0, 1, streams=2, prefetch=1, backend="local") as feed:
        local = [feed.next() for _ in range(3)]
        assert len(feed.local_pids()) >= 1
    with BatchFeed(spec, 0, 1, backend="inline") as feed:
        inline = [feed.next() for _ in range(3)]
    for i in range(3):
        assert_same_batch(local[i], reference[i])
        assert_same_batch(inline[i], reference[i])
    assert not np.array_equal(reference[0]["view1"], reference[1]["view1"])  # the comparison can fail


# ---------------------------------------------------------------- bad data


@pytest.fixture(scope="module")
def bad_images(moto_s3: Any) -> dict[str, Any]:
    """One shard of 40 Fashion-MNIST JPEGs where one is junk and one is cut in half."""
    images, _ = fmnist_arrays(str(FMNIST), "test")
    samples = [(f"img-{i:03d}", {"jpg": jpeg(images[i])}) for i in range(40)]
    whole = samples[17][1]["jpg"]
    samples[17] = ("img-017", {"jpg": whole[: len(whole) // 2]})
    samples[29] = ("img-029", {"jpg": np.random.default_rng(0).integers(0, 256, 900, np.uint8).tobytes()})
    dest = moto_s3.bucket("bad") + "/ds"
    add_shard(dest, "pretrain-bad-000000", samples, "image")
    snap = build_snapshot([SourceSpec(url=dest, split="pretrain")])
    return {"snapshot": snap, "keys": shard_keys(snap), "bad": {"img-017": "truncated JPEG",
                                                                "img-029": "unreadable image header"}}


def test_bad_samples_are_quarantined_flagged_listed_and_change_no_step(bad_images: dict[str, Any],
                                                                       moto_s3: Any) -> None:
    snap, bad = bad_images["snapshot"], bad_images["bad"]
    spec = FeedSpec(snap, 8, modality_args=ARGS, seed=1)
    run = moto_s3.bucket("run") + "/run-1"
    qurl = storage.join(run, "quarantine.jsonl")
    with BatchFeed(spec, 0, 1, streams=2, prefetch=2, backend="ray", stream_cpus=0.25, quarantine_url=qurl) as feed:
        steps = feed.steps_per_epoch()
        assert steps == spec.plan(0).num_batches == 5  # the plan's count: bad samples change nothing
        batches = [feed.next() for _ in range(steps)]
        assert feed.state_dict() == {"epoch": 0, "consumed": 5}
    flagged, records = {}, []
    for i, b in enumerate(batches):
        assert list(b["key"]) == planned_keys(spec, bad_images["keys"], 0, i)
        assert b["valid"].all() and b["view1"].shape == (8, 28, 28, 1)
        for slot in np.flatnonzero(b["quarantined"]):
            flagged[str(b["key"][slot])] = (i, int(b["position"][slot]))
            # the slot holds a copy of another, good sample of the same micro-batch
            assert any(all(np.array_equal(b[a][slot], b[a][j]) for a in ARRAYS)
                       for j in np.flatnonzero(~b["quarantined"]))
        records += b["quarantine"]
    assert set(flagged) == set(bad)  # flagged and counted: exactly the two bad samples
    assert sorted(r["key"] for r in records) == sorted(bad)
    lines = [json.loads(x) for x in storage.read_text(qurl).splitlines()]
    assert len(lines) == 2
    for rec in lines:
        assert rec["shard"] == snap.shards[0].url and rec["epoch"] == 0
        assert bad[rec["key"]] in rec["error"] and rec["position"] == flagged[rec["key"]][1]
    # a feed resumed over the same epoch does not list them twice
    with BatchFeed(spec, 0, 1, backend="inline", quarantine_url=qurl) as feed:
        again = [feed.next() for _ in range(steps)]
    assert sum(int(b["quarantined"].sum()) for b in again) == 2
    assert len(storage.read_text(qurl).splitlines()) == 2


def test_on_error_raise_names_the_first_bad_key(bad_images: dict[str, Any]) -> None:
    spec = FeedSpec(bad_images["snapshot"], 8, modality_args=ARGS, seed=1, on_error="raise")
    order = [k for i in range(spec.plan(0).num_batches) for k in planned_keys(spec, bad_images["keys"], 0, i)]
    first = next(k for k in order if k in bad_images["bad"])
    with BatchFeed(spec, 0, 1, backend="inline") as feed:
        with pytest.raises(SampleDecodeError, match=first) as err:
            for _ in range(spec.plan(0).num_batches):
                feed.next()
    assert bad_images["bad"][first] in str(err.value)
