"""selfsup on a real multi-node Ray cluster (tests/cluster/conftest.py): streams on stream nodes,
trainers on trainer nodes, a run on GCS, and nodes lost mid-epoch and mid-run, each with the exact
delivered sample set or the per-step losses asserted against an undisturbed run."""
from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from selfsup.jobs.cli import main
from selfsup.pipeline.feed import BatchFeed
from selfsup.trainers import checkpoint as ck
from selfsup.trainers import run_folder as rf
from tests.cluster.conftest import CONFIG, overrides
from tests.conftest import check_run_and_evaluate_on_gcs, dataset_on_s3

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def on_s3(moto_s3: Any) -> dict[str, Any]:
    """256 images in four shards on moto S3, and a clean inline epoch of them."""
    return dataset_on_s3(moto_s3, "multinode", 256, 4, seed=5)


def actors_by_class(names: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows of the GCS actor table (alive or dead) of the given classes."""
    import ray

    return [a for a in ray._private.state.actors().values() if a["ActorClassName"] in names]  # noqa: SLF001


def test_streams_run_on_stream_nodes_and_trainers_on_trainer_nodes(multinode, on_s3, moto_s3, capsys):
    run = moto_s3.bucket("runs") + "/placement"
    args = overrides(run, on_s3["url"], **{"train.steps": 4, "train.ckpt_every": 4, "scaling.num_workers": 2,
                                           "data.streams": 2})
    assert main(["pretrain", CONFIG, *args, "--address", multinode.address, "--quiet"]) == 0
    rows = actors_by_class(("ShardStream", "RayTrainWorker"))
    placed = sorted((a["ActorClassName"], multinode.role_of(a["Address"]["NodeID"]), a["Address"]["NodeID"][:8])
                    for a in rows)
    with capsys.disabled():
        print("\nplacement (actor class, node role, node id):")
        for row in placed:
            print("  ", *row)
    streams = [p for p in placed if p[0] == "ShardStream"]
    workers = [p for p in placed if p[0] == "RayTrainWorker"]
    assert len(streams) == 4 and {p[1] for p in streams} == {"stream"}  # 2 ranks × 2 streams
    assert len({p[2] for p in streams}) == 2  # spread over both stream nodes
    assert len(workers) == 2 and {p[1] for p in workers} == {"trainer"}
    assert len({p[2] for p in workers}) == 2  # one per trainer node (trainer: 1 each)
    assert ck.read_meta(ck.latest_checkpoint(run))["step"] == 4


def test_two_workers_on_gcs_then_evaluate(multinode, fake_gcs, fm_on_gcs):
    """A 2-worker run with data and run folder on gs:// (fake-gcs-server): streams and workers on their
    nodes read and write GCS with the options the config carries; its checkpoint is evaluated from GCS."""
    run = fake_gcs.bucket("runs") + "/two-workers"
    storage_args = {f"storage.{k}": v for k, v in fake_gcs.options.items()}
    args = overrides(run, fm_on_gcs, **{"train.steps": 4, "train.ckpt_every": 4, "scaling.num_workers": 2,
                                        "data.batch_size": 32}, **storage_args)
    assert main(["pretrain", CONFIG, *args, "--address", multinode.address, "--quiet"]) == 0
    check_run_and_evaluate_on_gcs(run, fm_on_gcs, fake_gcs.options, steps=4, world_size=2)


def test_a_stream_node_removed_mid_epoch_loses_and_repeats_nothing(multinode, on_s3):
    import ray

    spec, got = on_s3["spec"], []
    with BatchFeed(spec, streams=4, prefetch=2, backend="ray", stream_cpus=0.25,
                   stream_resources={"stream": 1}) as feed:
        steps = feed.steps_per_epoch()
        nodes = ray.get([h.node_id.remote() for h in feed.stream_handles()])
        assert len(set(nodes)) == 2 and {multinode.role_of(n) for n in nodes} == {"stream"}
        for k in range(steps):
            got.append(feed.next())
            if k == 8:
                multinode.remove(multinode.node_of(nodes[0]))  # the processes are killed, not drained
        after = ray.get([h.node_id.remote() for h in feed.stream_handles()])
        assert feed.restarts >= 1 and set(after) == {multinode.stream[0].node_id}  # the survivor
        assert feed.isolated == 0  # the node's loss was not held against the batches its streams were making
    delivered = [(s, int(p)) for b in got for s, p, v in zip(b["shard"], b["position"], b["valid"]) if v]
    assert sorted(delivered) == sorted(on_s3["keys"])  # every planned sample once
    for b, want in zip(got, on_s3["clean"]):
        for name in ("view1", "view2", "key", "position"):
            np.testing.assert_array_equal(b[name], want[name])

    back = multinode.add("stream")  # the node comes back: new streams may use it
    with BatchFeed(spec, streams=4, prefetch=1, backend="ray", stream_cpus=0.25,
                   stream_resources={"stream": 1}) as feed:
        assert back.node_id in ray.get([h.node_id.remote() for h in feed.stream_handles()])
        np.testing.assert_array_equal(feed.next()["view1"], on_s3["clean"][0]["view1"])


def test_a_stream_node_removed_under_an_isolated_worker_blames_no_sample(multinode, on_s3):
    """A suspect batch is made sample by sample in an isolated worker; when that worker's node dies,
    each call is made again on another node instead of taking the sample for one that kills its worker."""
    import ray
    from selfsup.pipeline.batch import BatchMaker
    from selfsup.pipeline.workers import IsolatedWorker

    spec = on_s3["spec"]
    want = BatchMaker(spec).keys(0, 3)
    with BatchFeed(spec, streams=1, prefetch=1, backend="ray", stream_cpus=0.25,
                   stream_resources={"stream": 1}) as feed, IsolatedWorker(feed) as iso:
        first = ray.get(iso.node_ref)
        assert multinode.role_of(first) == "stream"
        multinode.remove(multinode.node_of(first))  # killed, not drained: Ray finds it dead seconds later
        try:
            keys = iso.call("keys", 0, 3)
            checks = [iso.call("check", 0, 3, slot) for slot in range(len(want))]
            batch = iso.call("make", 0, 3, frozenset())
            now = ray.get(iso.node_ref)
        finally:
            multinode.add("stream")  # the later tests find two stream nodes
    assert [tuple(k) for k in keys] == want and checks == [True] * len(want)  # no sample blamed
    np.testing.assert_array_equal(batch["view1"], on_s3["clean"][3]["view1"])
    assert now != first and first in feed.nodes.suspects


def test_a_node_removed_under_eval_workers_blames_no_batch(multinode, on_s3):
    """Feature extraction for kNN / linear probe: a worker's node killed mid-way costs the batches it held,
    made again on a new worker elsewhere, not an error blaming a batch's samples; the features equal an
    undisturbed extraction's."""
    from selfsup.pipeline.batch import FeedSpec
    from selfsup.trainers.features import extract
    from tests.conftest import ARGS

    spec = FeedSpec(on_s3["snapshot"], 8, modality_args=ARGS, seed=5, train=False, label="cls")
    clean = extract(spec, {"raw": {"kind": "raw"}}, None, None, workers=2, use_ray=False)
    removed: list[str] = []

    def remove_a_workers_node(_: int) -> None:
        if not removed:
            alive = [a for a in actors_by_class(("FeatureWorker",)) if a["State"] == "ALIVE"]
            node = alive[0]["Address"]["NodeID"]
            removed.append(multinode.role_of(node))
            multinode.remove(multinode.node_of(node))

    try:
        got = extract(spec, {"raw": {"kind": "raw"}}, None, None, workers=2, use_ray=True, num_cpus=0.25,
                      progress=remove_a_workers_node)
    finally:
        for role in removed:
            multinode.add(role)  # the later tests find the nodes they expect
    assert removed and removed[0] in ("stream", "trainer")
    for name in ("key", "label", "raw"):
        np.testing.assert_array_equal(got[name], clean[name])
    assert got["quarantined"] == clean["quarantined"] == 0


def losses(run: str) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in rf.read_metrics(run)}


ONE_WORKER = {"train.steps": 16, "train.ckpt_every": 4, "scaling.num_workers": 1, "scaling.max_failures": 2}


@pytest.fixture(scope="module")
def steady(multinode, on_s3, moto_s3) -> dict[int, float]:
    """Per-step losses of the one-worker run the node-loss tests disturb, undisturbed."""
    run = moto_s3.bucket("runs") + "/steady"
    assert main(["pretrain", CONFIG, *overrides(run, on_s3["url"], **ONE_WORKER),
                 "--address", multinode.address, "--quiet"]) == 0
    return losses(run)


def trainer_node(multinode) -> Any:
    """The node of the live Ray Train worker."""
    alive = [a for a in actors_by_class(("RayTrainWorker",)) if a["State"] == "ALIVE"]
    return multinode.node_of(alive[0]["Address"]["NodeID"])


def test_a_trainer_node_removed_mid_run_resumes_on_the_other_with_the_same_losses(multinode, on_s3, moto_s3,
                                                                                   steady):
    extra = ONE_WORKER
    run = moto_s3.bucket("runs") + "/node-lost"
    removed: list[str] = []
    before = {a["ActorID"] for a in actors_by_class(("RayTrainWorker",))}

    def remove_the_trainer_node() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            found = ck.list_checkpoints(run)
            if found and found[-1][0] >= 8 and ck.storage.exists(ck.storage.join(found[-1][1], ck.META)):
                break
            time.sleep(0.1)
        node = trainer_node(multinode)
        removed.append(node.node_id)
        multinode.remove(node)

    thread = threading.Thread(target=remove_the_trainer_node, daemon=True)
    thread.start()
    assert main(["pretrain", CONFIG, *overrides(run, on_s3["url"], **extra),
                 "--address", multinode.address, "--quiet"]) == 0
    thread.join(10)
    assert removed, "the trainer node was not removed"
    got = losses(run)
    assert sorted(got) == list(range(1, 17))
    for step in range(1, 17):  # after the restart from step 8's checkpoint, the same losses
        assert got[step] == pytest.approx(steady[step], abs=1e-6), step
    ran_on = [a["Address"]["NodeID"] for a in sorted(actors_by_class(("RayTrainWorker",)), key=lambda a: a["StartTime"])
              if a["ActorID"] not in before]
    assert ran_on[0] == removed[0] and len(ran_on) == 2  # the first worker, then its restart
    assert multinode.role_of(ran_on[1]) == "trainer" and ran_on[1] != removed[0]  # on the other trainer node


def test_a_node_lost_while_a_checkpoint_is_written_restarts_from_the_previous_complete_one(
        multinode, on_s3, moto_s3, steady):
    """The trainer node dies while step 8's state.pt is on its way to S3 (held by the proxy):
    step 8 never becomes a complete checkpoint (meta.json is written last), the restart uses
    step 4's, and the losses still equal the undisturbed run's."""
    from tests.chaos.s3proxy import S3Proxy

    if len(multinode.trainer) < 2:
        multinode.add("trainer")
    run = moto_s3.bucket("runs") + "/lost-mid-checkpoint"
    seen: dict[str, Any] = {}
    with S3Proxy(moto_s3.endpoint) as proxy:
        upload = proxy.hold("PUT", "step-000008/state.pt", seconds=3.0)

        def remove_while_uploading() -> None:
            if upload.arrived.wait(300):
                node = trainer_node(multinode)
                multinode.remove(node)
                seen["latest"] = ck.latest_checkpoint(run)
                seen["removed"] = node.node_id

        thread = threading.Thread(target=remove_while_uploading, daemon=True)
        thread.start()
        args = overrides(run, on_s3["url"], **ONE_WORKER, storage=f"{{endpoint_url: {proxy.endpoint}}}")
        assert main(["pretrain", CONFIG, *args, "--address", multinode.address, "--quiet"]) == 0
        thread.join(10)
    assert seen.get("removed"), "the node was not removed during the upload"
    assert seen["latest"].endswith("step-000004")  # step 8 was not visible as a checkpoint
    steps = [m["step"] for m in rf.read_metrics(run)]
    assert steps.count(5) == 2 and steps.count(9) == 1  # steps 5-8 ran again after the restart from step 4
    got = losses(run)
    for step in range(1, 17):
        assert got[step] == pytest.approx(steady[step], abs=1e-6), step
    assert ck.read_meta(ck.latest_checkpoint(run))["step"] == 16
