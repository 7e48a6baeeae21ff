"""Stream nodes on demand: a run that asks for `stream` streams makes the autoscaler launch
stream nodes from zero, and once it ends the idle stream nodes go away; the trainer node type
keeps its minimum. Ray's fake multi-node provider launches real raylets (tests/cluster/autoscaling.py).
The drivers (the run, the node counter) are processes of their own: they take the cluster's token
auth settings from their environment, which Ray reads once per process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from selfsup.trainers import checkpoint as ck
from tests.cluster.autoscaling import FakeAutoscalingCluster
from tests.conftest import FMNIST, ROOT, run_cli

pytestmark = pytest.mark.cluster
CONFIG = str(ROOT / "jobs" / "configs" / "simclr_image.yaml")
# the node types of infra/aws and infra/gcp, at this machine's size: spot CPU stream nodes offering
# `stream`, trainer nodes (GPU in the cloud; a `trainer` resource here)
NODE_TYPES = {
    "stream_cpu": {"resources": {"CPU": 1, "stream": 4}, "node_config": {}, "min_workers": 0, "max_workers": 3},
    "trainer": {"resources": {"CPU": 1, "trainer": 1}, "node_config": {}, "min_workers": 1, "max_workers": 1},
}
MARKS = {"stream_cpu": ["stream"], "trainer": ["trainer"]}


def test_stream_nodes_scale_up_from_zero_for_a_run_and_down_when_idle(tmp_path, tmp_path_factory, capsys):
    data = str(tmp_path / "fm")
    res = run_cli("shards", "write", str(FMNIST), data, "--modality", "image", "--limit", "512",
                  "--samples-per-shard", "128", "--workers", "1", "--quiet")
    assert res.returncode == 0, res.stderr
    # a short temp dir: Ray's socket paths under it must stay within the 107 bytes of a unix socket name
    cluster = FakeAutoscalingCluster(tmp_path_factory.mktemp("as"), NODE_TYPES, idle_timeout_minutes=0.25)
    env = {**os.environ, **cluster.auth_env}
    timeline: list[tuple[float, dict[str, int]]] = []
    cluster.start()
    t0 = time.time()
    counter = subprocess.Popen([sys.executable, "-m", "tests.cluster.node_counts", cluster.address, json.dumps(MARKS)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def read() -> None:
        assert counter.stdout is not None
        for line in counter.stdout:
            rec = json.loads(line)
            timeline.append((rec["time"] - t0, rec["counts"]))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def now() -> dict[str, int]:
        return timeline[-1][1] if timeline else {}

    def wait_until(pred, timeout: float) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if pred():
                return True
            time.sleep(0.5)
        return False

    try:
        assert wait_until(lambda: now().get("trainer") == 1, 120), timeline  # min_workers
        assert now().get("stream_cpu", 0) == 0
        run = str(tmp_path / "run")
        args = [f"run={run}", f"data.sources=[{{url: {data}}}]", "data.batch_size=16",
                "data.modality_args={size: 28, channels: 1}", "data.streams=2", "data.stream_cpus=0.25",
                "data.stream_resources={stream: 1}", "scaling.num_workers=1", "scaling.cpus_per_worker=0.25",
                "scaling.resources_per_worker={trainer: 1}", "train.steps=20", "train.log_every=5",
                "train.ckpt_every=20", "train.warmup_steps=2", "objective.backbone_args.width=8"]
        ran_at = time.time() - t0
        res = run_cli("pretrain", CONFIG, *args, "--address", cluster.address, "--quiet", env=env)
        ended_at = time.time() - t0
        assert res.returncode == 0, res.stderr[-3000:]
        assert ck.read_meta(ck.latest_checkpoint(run))["step"] == 20
        assert max(c.get("stream_cpu", 0) for _, c in timeline) >= 1, timeline  # scaled up from zero
        assert wait_until(lambda: now().get("stream_cpu", 0) == 0, 120), f"idle stream nodes stayed: {timeline}"
        assert now().get("trainer") == 1  # the minimum stays
    finally:
        counter.kill()
        counter.wait(10)
        cluster.stop()
    assert cluster.ours() == []  # nothing of this cluster left running
    with capsys.disabled():
        print(f"\nautoscaler node counts over time (run from {ran_at:.1f} s to {ended_at:.1f} s):")
        for t, counts in timeline:
            print(f"  {t:6.1f} s  " + "  ".join(f"{k}={v}" for k, v in sorted(counts.items())))
