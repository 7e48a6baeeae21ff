"""ShardStream: a Ray actor on CPU that makes micro-batches on request.

`batch(epoch, i)` is a pure function of the feed spec, so any stream can make any batch and a
feed that loses a stream simply asks a new one. Streams ask only for CPU (plus optional custom
resources such as `stream`, which CPU worker nodes offer), so they can sit on CPU-only
nodes. They are never restarted by Ray (`max_restarts=0`): the feed replaces them.
"""
from __future__ import annotations

import os
from typing import AbstractSet, Any, Mapping, Optional, Sequence

import ray

from selfsup.pipeline.batch import BatchMaker, FeedSpec, keep_freed_memory

NODE_ID_LABEL = "ray.io/node-id"  # the label Ray gives every node: its id


@ray.remote(max_restarts=0, max_task_retries=0)
class ShardStream:
    """Makes micro-batches of one feed spec; holds shard indexes and plans in memory."""

    def __init__(self, spec: FeedSpec) -> None:
        keep_freed_memory()  # the actor's process only makes batches
        self.maker = BatchMaker(spec)

    def batch(self, epoch: int, i: int, killers: AbstractSet[tuple[str, str]] = frozenset()) -> dict[str, Any]:
        """Micro-batch i of `epoch` (`killers`: samples known to kill their process, quarantined)."""
        return self.maker.make(epoch, i, killers)

    def keys(self, epoch: int, i: int) -> list[tuple[str, str]]:
        """(shard URL, key) of each row of micro-batch i."""
        return self.maker.keys(epoch, i)

    def check(self, epoch: int, i: int, slot: int) -> bool:
        """Make only row `slot` of micro-batch i (isolating a sample that kills its process)."""
        return self.maker.check(epoch, i, slot)

    def memory(self) -> dict[str, int]:
        """This process's peak and current resident bytes (Linux VmHWM, VmRSS; 0 elsewhere) and its index cache."""
        return {**process_memory(), **{f"index_cache_{k}": v for k, v in self.maker.index_stats().items()}}

    def io_stats(self) -> dict[str, float]:
        """This stream's ranged reads: count, bytes, seconds, most in flight at once, reads begun during a decode."""
        return self.maker.reads.stats()

    def pid(self) -> int:
        """The actor's process id (tests kill it to check recovery)."""
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node the actor runs on."""
        return ray.get_runtime_context().get_node_id()


def start_stream(spec: FeedSpec, num_cpus: float = 1.0, resources: Optional[Mapping[str, float]] = None,
                 name: Optional[str] = None, avoid: Sequence[str] = ()) -> Any:
    """Start one ShardStream actor asking for `num_cpus` and custom `resources`, spread over the
    nodes that offer them (losing a node then costs a share of the streams, not all of them).

    `avoid`: ids of nodes to keep it off while another node can take it (nodes that just failed
    but that Ray has not yet found dead); when none can, it may still go there.
    """
    opts: dict[str, Any] = {"num_cpus": num_cpus, "scheduling_strategy": "SPREAD"}
    if resources:
        opts["resources"] = dict(resources)
    opts.update(keep_off(avoid))
    if name:
        opts["name"] = name
    return ShardStream.options(**opts).remote(spec)  # type: ignore[attr-defined]  # @ray.remote made it an actor class


def keep_off(nodes: Sequence[str]) -> dict[str, Any]:
    """Ray actor options that keep an actor off `nodes` while another node can take it; when none
    can, it goes there rather than wait forever."""
    if not nodes:
        return {}
    return {"label_selector": {NODE_ID_LABEL: f"!in({','.join(sorted(nodes))})"},
            "fallback_strategy": [{"label_selector": {}}]}


def process_memory() -> dict[str, int]:
    """{"peak_rss": VmHWM, "rss": VmRSS} of this process in bytes, from /proc/self/status (zeros elsewhere)."""
    out = {"peak_rss": 0, "rss": 0}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("VmHWM", "VmRSS"):
                    out["peak_rss" if name == "VmHWM" else "rss"] = int(value.split()[0]) * 1024  # kB
    except OSError:
        pass
    return out
