"""A real multi-node Ray cluster on one machine: a head with no work resources, two stream nodes
(`stream: 4`, 1 CPU: the resource infra/'s stream node types offer) and two trainer nodes
(`trainer: 1`, 1 CPU), each its own raylet with its own object store (`ray.cluster_utils.Cluster`),
on 127.0.0.1 with its temp dir in pytest's tmp.

These tests need a process of their own (a driver connects to one cluster): `make test-cluster`
runs them all, `.ci/run` the fastest; the default suite deselects the `cluster` marker.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from typing import Any, Iterator

import pytest

from tests.conftest import ROOT, TRAIN_POLL, restore_environ

CONFIG = str(ROOT / "jobs" / "configs" / "simclr_image.yaml")
NODE = {"node_ip_address": "127.0.0.1", "object_store_memory": 100 * 2**20, "include_dashboard": False}


@dataclass
class MultiNode:
    """The cluster, its address and its nodes by role."""

    cluster: Any
    temp_dir: str
    stream: list[Any] = field(default_factory=list)
    trainer: list[Any] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.cluster.address

    def add(self, role: str) -> Any:
        """Start one more node of `role` ('stream' or 'trainer') and wait for it."""
        resources = {"stream": 4.0} if role == "stream" else {"trainer": 1.0}
        node = self.cluster.add_node(num_cpus=1, resources=resources, temp_dir=self.temp_dir, **NODE)
        self.cluster.wait_for_nodes()
        getattr(self, role).append(node)
        return node

    def remove(self, node: Any) -> None:
        """Kill every process of `node` at once, its workers too (no graceful drain). Ray's
        remove_node kills the raylet and its services; a worker would only exit seconds later, when
        it notices, and could go on answering calls in between, as no real lost node does."""
        workers = descendants(node.all_processes["raylet"][0].process.pid)
        self.cluster.remove_node(node, allow_graceful=False)
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for role in (self.stream, self.trainer):
            if node in role:
                role.remove(node)

    def node_of(self, node_id: str) -> Any:
        return next(n for n in [*self.stream, *self.trainer] if n.node_id == node_id)

    def role_of(self, node_id: str) -> str:
        for role in ("stream", "trainer"):
            if any(n.node_id == node_id for n in getattr(self, role)):
                return role
        return "head" if self.cluster.head_node.node_id == node_id else "unknown"


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (children, theirs, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], list(children.get(pid, []))
    while todo:
        out.append(todo.pop())
        todo += children.get(out[-1], [])
    return out


@pytest.fixture(scope="module")
def multinode(moto_s3: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiNode]:
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.fail("the cluster tests need a process of their own: run `make test-cluster` "
                    "(or `pytest -m cluster tests/cluster`)")
    tmp = str(tmp_path_factory.mktemp("mn"))
    saved = {k: os.environ.get(k) for k in TRAIN_POLL}
    os.environ.update(TRAIN_POLL)  # the raylets, and so Ray Train's controller, inherit it (and moto's settings)
    saved["RAY_ADDRESS"] = os.environ.get("RAY_ADDRESS")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "temp_dir": tmp, **NODE})
    os.environ["RAY_ADDRESS"] = cluster.address  # Ray's own helpers that look for "the" cluster find this one
    mn = MultiNode(cluster, tmp)
    try:
        for role in ("stream", "stream", "trainer", "trainer"):
            mn.add(role)
        cluster.connect()
        yield mn
    finally:
        ray.shutdown()
        cluster.shutdown()
        restore_environ(saved)


def overrides(run: str, data: str, **extra: object) -> list[str]:
    """`selfsup pretrain` overrides for a small run on this cluster: streams on stream nodes, workers on
    trainer nodes, CPU-sized; `extra` (dotted key → value) wins."""
    base = {"run": run, "data.sources": f"[{{url: {data}}}]", "train.warmup_steps": 2, "train.log_every": 1,
            "data.batch_size": 16, "data.modality_args": "{size: 28, channels: 1}", "data.streams": 1,
            "data.stream_cpus": 0.25, "data.stream_resources": "{stream: 1}", "scaling.cpus_per_worker": 0.25,
            "scaling.resources_per_worker": "{trainer: 1}", "objective.backbone_args.width": 8}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
