"""Stream nodes on demand: a run that asks for `shardstream` streams makes the autoscaler launch
stream nodes from zero, and once it ends the idle stream nodes go away; the trainer node type
keeps its minimum. Ray's fake multi-node provider launches real raylets (tests/cluster/autoscaling.py).
"""
from __future__ import annotations

import threading
import time

import pytest

from selfsup.jobs.cli import main
from selfsup.trainers import checkpoint as ck
from tests.cluster.autoscaling import HEAD, FakeAutoscalingCluster, wait_for
from tests.conftest import FMNIST, ROOT, run_cli

pytestmark = pytest.mark.cluster
CONFIG = str(ROOT / "jobs" / "configs" / "simclr_image.yaml")
# the node types of infra/aws and infra/gcp, at this machine's size: spot CPU stream nodes offering
# `shardstream`, trainer nodes (GPU in the cloud; a `trainer` resource here)
NODE_TYPES = {
    "cpu_streams": {"resources": {"CPU": 1, "shardstream": 4}, "node_config": {}, "min_workers": 0, "max_workers": 3},
    "trainer": {"resources": {"CPU": 1, "trainer": 1}, "node_config": {}, "min_workers": 1, "max_workers": 1},
}


def test_stream_nodes_scale_up_from_zero_for_a_run_and_down_when_idle(tmp_path, capsys):
    import ray

    data = str(tmp_path / "fm")
    res = run_cli("shards", "write", str(FMNIST), data, "--modality", "image", "--limit", "512",
                  "--samples-per-shard", "128", "--workers", "1", "--quiet")
    assert res.returncode == 0, res.stderr
    cluster = FakeAutoscalingCluster(tmp_path / "as", NODE_TYPES, idle_timeout_minutes=0.25)
    (tmp_path / "as").mkdir()
    timeline: list[tuple[float, dict[str, int]]] = []
    stop = threading.Event()
    cluster.start()
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        t0 = time.monotonic()

        def record() -> None:
            while not stop.wait(0.5):
                counts = cluster.node_counts()
                if not timeline or timeline[-1][1] != counts:
                    timeline.append((time.monotonic() - t0, counts))

        recorder = threading.Thread(target=record, daemon=True)
        recorder.start()
        assert wait_for(lambda: cluster.node_counts().get("trainer") == 1, 120) is not None  # min_workers
        assert cluster.node_counts().get("cpu_streams", 0) == 0
        run = str(tmp_path / "run")
        args = [f"run={run}", f"data.sources=[{{url: {data}}}]", "data.batch_size=16",
                "data.modality_args={size: 28, channels: 1}", "data.streams=2", "data.stream_cpus=0.25",
                "data.stream_resources={shardstream: 1}", "scaling.num_workers=1", "scaling.cpus_per_worker=0.25",
                "scaling.resources_per_worker={trainer: 1}", "train.steps=20", "train.log_every=5",
                "train.ckpt_every=20", "train.warmup_steps=2", "objective.backbone_args.width=8"]
        ran_at = time.monotonic() - t0
        assert main(["pretrain", CONFIG, *args, "--address", cluster.address, "--quiet"]) == 0
        ended_at = time.monotonic() - t0
        assert ck.read_meta(ck.latest_checkpoint(run))["step"] == 20
        assert max(c.get("cpu_streams", 0) for _, c in timeline) >= 1  # scaled up from zero for the run
        gone = wait_for(lambda: cluster.node_counts().get("cpu_streams", 0) == 0, 120)
        assert gone is not None, f"idle stream nodes were not removed: {timeline}"
        assert cluster.node_counts().get("trainer") == 1  # the minimum stays
    finally:
        stop.set()
        ray.shutdown()
        cluster.stop()
    assert cluster.ours() == []  # nothing of this cluster left running
    with capsys.disabled():
        print(f"\nautoscaler node counts over time (run started at {ran_at:.1f} s, ended at {ended_at:.1f} s):")
        for t, counts in timeline:
            print(f"  {t:6.1f} s  " + "  ".join(f"{k}={v}" for k, v in sorted(counts.items()) if k != HEAD))
