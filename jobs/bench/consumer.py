"""A trainer rank without the model: the consumer `selfsup bench cluster` places on its trainer node."""
from __future__ import annotations

from typing import Any


class Rank:
    """Rank `rank` of `world`: a BatchFeed over `streams` ShardStreams on the `stream` nodes.

    Made a Ray actor by the caller (jobs/bench/cluster.py), so that this module needs no Ray.
    """

    def __init__(self, spec: Any, rank: int, world: int, streams: int, prefetch: int, stream_cpus: float) -> None:
        from selfsup.pipeline.feed import BatchFeed

        self.feed = BatchFeed(spec, rank=rank, world=world, streams=streams, prefetch=prefetch, backend="ray",
                              stream_cpus=stream_cpus, stream_resources={"stream": 1})

    def warm(self) -> None:
        """One batch from every stream, thrown away: in training the streams live for the whole run."""
        import ray

        plan = self.feed.spec.plan(0)
        ray.get([h.batch.remote(0, i % plan.num_batches) for i, h in enumerate(self.feed.stream_handles())])

    def stream_nodes(self) -> list[str]:
        """The node id of each of this rank's streams."""
        import ray

        return list(ray.get([h.node_id.remote() for h in self.feed.stream_handles()]))

    def epoch(self) -> dict[str, Any]:
        """Read this rank's share of epoch 0 from the start: the (shard, position) of every sample, and
        the seconds spent waiting for batches."""
        self.feed.load_state_dict({"epoch": 0, "consumed": 0})
        wait0, keys = self.feed.wait_s, []  # type: float, list[tuple[str, int]]
        for _ in range(self.feed.steps_per_epoch()):
            b = self.feed.next()
            keys.extend((s, int(p)) for s, p, v in zip(b["shard"], b["position"], b["valid"]) if v)
        return {"keys": keys, "wait_s": self.feed.wait_s - wait0}

    def close(self) -> None:
        self.feed.close()
