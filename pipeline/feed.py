"""BatchFeed: a trainer rank's source of micro-batches — prefetching, resumable, exactly once.

The feed walks the global micro-batch sequence from a data position (epoch, micro-batches
consumed): at step k rank r of W takes micro-batch consumed + k·W + r, and an epoch ends when
the next step would not give every rank a batch. It keeps `prefetch` requests in flight per
stream, round-robin, so memory stays bounded by streams × prefetch × batch bytes.

Backends (the same batches, byte for byte):
- `ray`: ShardStream actors; a dead actor is replaced and its unconsumed requests re-sent;
- `local`: worker processes (multiprocessing), for single machines without Ray;
- `inline`: the calling thread (tests, debugging).
"""
from __future__ import annotations

import collections
import json
import logging
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any, Iterator, Mapping, Optional

from selfsup.pipeline import storage
from selfsup.pipeline.batch import BatchMaker, FeedSpec, keep_freed_memory

log = logging.getLogger(__name__)
BACKENDS = ("ray", "local", "inline")


@dataclass
class _Request:
    epoch: int
    index: int
    consumed_after: int  # the data position once this batch is consumed
    slot: int
    handle: Any = None


class BatchFeed:
    """Micro-batches for one rank, prefetched from streams; `state_dict()` is the data position."""

    def __init__(self, spec: FeedSpec, rank: int = 0, world: int = 1, streams: int = 2, prefetch: int = 2,
                 backend: str = "ray", stream_cpus: float = 1.0,
                 stream_resources: Optional[Mapping[str, float]] = None,
                 quarantine_url: Optional[str] = None) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown feed backend {backend!r}; valid: {', '.join(BACKENDS)}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        self.spec, self.rank, self.world = spec, rank, world
        self.backend = backend
        self.num_streams = max(1, streams) if backend != "inline" else 1
        self.prefetch = max(1, prefetch)
        self.stream_cpus, self.stream_resources = stream_cpus, stream_resources
        self.quarantine_url = quarantine_url
        self._seen_quarantine: set[tuple] = set()
        self.epoch, self.consumed = 0, 0
        self._req_epoch, self._req_consumed = 0, 0
        self._pending: collections.deque[_Request] = collections.deque()
        self._sent = 0
        self.wait_s, self.batches, self.last_wait_s = 0.0, 0, 0.0
        self.restarts, self.quarantined = 0, 0
        self._workers: list[Any] = []
        self._pool: Optional[ProcessPoolExecutor] = None
        self._inline: Optional[BatchMaker] = None
        self._start_workers()
        if quarantine_url:
            self._load_seen_quarantine()

    # ------------------------------------------------------------ position

    def state_dict(self) -> dict[str, int]:
        """The data position: epoch and global micro-batches consumed in it."""
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from a data position (drops anything prefetched)."""
        self._drop_pending()
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self._req_epoch, self._req_consumed = self.epoch, self.consumed

    def steps_left_in_epoch(self) -> int:
        """Steps this feed can still take in the current epoch."""
        return self.spec.plan(self.epoch).steps(self.world, self.consumed)

    def steps_per_epoch(self, epoch: Optional[int] = None) -> int:
        """Steps per rank in a whole epoch at this world size."""
        return self.spec.plan(self.epoch if epoch is None else epoch).steps(self.world)

    # ------------------------------------------------------------ requests

    def _next_request(self) -> _Request:
        while True:
            plan = self.spec.plan(self._req_epoch)
            if plan.num_batches < self.world:
                raise ValueError(f"epoch {self._req_epoch} has {plan.num_batches} micro-batches, fewer than "
                                 f"the {self.world} ranks: use a smaller batch size or more data")
            if self._req_consumed + self.world <= plan.num_batches:
                break
            self._req_epoch, self._req_consumed = self._req_epoch + 1, 0
        req = _Request(self._req_epoch, self._req_consumed + self.rank, self._req_consumed + self.world,
                       self._sent % self.num_streams)
        self._req_consumed += self.world
        self._sent += 1
        return req

    def _fill(self) -> None:
        while len(self._pending) < self.num_streams * self.prefetch:
            req = self._next_request()
            req.handle = self._submit(req)
            self._pending.append(req)

    def _submit(self, req: _Request) -> Any:
        if self.backend == "ray":
            return self._workers[req.slot].batch.remote(req.epoch, req.index)
        if self.backend == "local":
            assert self._pool is not None
            return self._pool.submit(_local_make, req.epoch, req.index)
        return None  # inline: made when consumed

    # ------------------------------------------------------------ consuming

    def next(self) -> dict[str, Any]:
        """The rank's next micro-batch (blocks while it is being made; the wait is data stall)."""
        self._fill()
        req = self._pending[0]
        t0 = time.perf_counter()
        batch = self._result(req)
        self.last_wait_s = time.perf_counter() - t0
        self.wait_s += self.last_wait_s
        self.batches += 1
        self._pending.popleft()
        self.epoch, self.consumed = req.epoch, req.consumed_after
        if batch.get("quarantine"):
            self.quarantined += len(batch["quarantine"])
            self._record_quarantine(batch["quarantine"])
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield self.next()

    def _result(self, req: _Request) -> dict[str, Any]:
        if self.backend == "inline":
            assert self._inline is not None
            return self._inline.make(req.epoch, req.index)
        if self.backend == "ray":
            return self._ray_result(req)
        while True:
            try:
                return req.handle.result()
            except BrokenProcessPool:
                log.warning("a local stream process died; restarting the pool and re-sending %d requests",
                            len(self._pending))
                self.restarts += 1
                self._restart_pool()

    def _ray_result(self, req: _Request) -> dict[str, Any]:
        import ray
        from ray.exceptions import RayActorError

        while True:
            try:
                return ray.get(req.handle)
            except RayActorError:
                log.warning("stream %d died; starting a new one and re-sending its %d requests", req.slot,
                            sum(1 for r in self._pending if r.slot == req.slot))
                self.restarts += 1
                self._replace_stream(req.slot)

    # ------------------------------------------------------------ workers

    def _start_workers(self) -> None:
        if self.backend == "ray":
            from selfsup.pipeline.stream import start_stream

            self._workers = [start_stream(self.spec, self.stream_cpus, self.stream_resources)
                             for _ in range(self.num_streams)]
        elif self.backend == "local":
            self._pool = ProcessPoolExecutor(self.num_streams, mp_context=get_context("spawn"),
                                             initializer=_local_init, initargs=(self.spec,))
        else:
            self._inline = BatchMaker(self.spec)

    def _replace_stream(self, slot: int) -> None:
        import ray
        from selfsup.pipeline.stream import start_stream

        try:
            ray.kill(self._workers[slot])
        except Exception:  # noqa: BLE001 - it is already dead
            pass
        self._workers[slot] = start_stream(self.spec, self.stream_cpus, self.stream_resources)
        for r in self._pending:
            if r.slot == slot:
                r.handle = self._submit(r)

    def _restart_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = ProcessPoolExecutor(self.num_streams, mp_context=get_context("spawn"),
                                         initializer=_local_init, initargs=(self.spec,))
        for r in self._pending:
            r.handle = self._submit(r)

    def stream_handles(self) -> list[Any]:
        """The Ray actor handles (ray backend)."""
        return list(self._workers)

    def local_pids(self) -> list[int]:
        """Process ids of the local backend's workers."""
        return list(self._pool._processes) if self._pool is not None else []  # noqa: SLF001

    def _drop_pending(self) -> None:
        for r in self._pending:
            if isinstance(r.handle, Future):
                r.handle.cancel()
        self._pending.clear()

    def close(self) -> None:
        """Stop the streams or worker processes."""
        self._drop_pending()
        if self.backend == "ray":
            import ray

            for w in self._workers:
                try:
                    ray.kill(w)
                except Exception:  # noqa: BLE001
                    pass
            self._workers = []
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "BatchFeed":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------ quarantine

    def _load_seen_quarantine(self) -> None:
        assert self.quarantine_url
        if storage.exists(self.quarantine_url, self.spec.storage_options):
            for line in storage.read_text(self.quarantine_url, self.spec.storage_options).splitlines():
                try:
                    rec = json.loads(line)
                    self._seen_quarantine.add((rec["epoch"], rec["shard"], rec["key"]))
                except (ValueError, KeyError):
                    continue

    def _record_quarantine(self, records: list[dict[str, Any]]) -> None:
        for rec in records:
            ident = (rec["epoch"], storage.redact_url(rec["shard"]), rec["key"])
            log.warning("quarantined %s in %s: %s", rec["key"], storage.redact_url(rec["shard"]), rec["error"])
            if self.quarantine_url and ident not in self._seen_quarantine:
                self._seen_quarantine.add(ident)
                storage.append_line(self.quarantine_url, json.dumps({**rec, "shard": storage.redact_url(rec["shard"])}),
                                    self.spec.storage_options)

    def stats(self) -> dict[str, float]:
        """Data stall so far: seconds waited, batches taken, the last wait, stream restarts, quarantined."""
        return {"wait_s": self.wait_s, "batches": self.batches, "last_wait_s": self.last_wait_s,
                "restarts": self.restarts, "quarantined": self.quarantined}


_LOCAL_MAKER: Optional[BatchMaker] = None


def _local_init(spec: FeedSpec) -> None:
    global _LOCAL_MAKER
    keep_freed_memory()  # a worker process that only makes batches
    _LOCAL_MAKER = BatchMaker(spec)


def _local_make(epoch: int, index: int) -> dict[str, Any]:
    assert _LOCAL_MAKER is not None
    return _LOCAL_MAKER.make(epoch, index)
