"""BatchFeed: a trainer rank's source of micro-batches — prefetching, resumable, exactly once.

The feed walks the global micro-batch sequence from a data position (epoch, micro-batches
consumed): at step k rank r of W takes micro-batch consumed + k·W + r, and an epoch ends when
the next step would not give every rank a batch. It keeps `prefetch` requests in flight per
stream, round-robin, so memory stays bounded by streams × prefetch × batch bytes.

Backends (the same batches, byte for byte):
- `ray`: ShardStream actors; a dead actor is replaced and its unconsumed requests re-sent (one lost
  with its node, or unreachable, is replaced on another node and counts against no batch);
- `local`: worker processes (multiprocessing), for single machines without Ray;
- `inline`: the calling thread (tests, debugging).

A batch whose making killed its worker `max_deaths` times (a decoder crash, the OOM killer,
Ray's memory monitor) is not sent again: a fresh isolated worker makes its samples one by one,
the samples that kill it are quarantined like decode failures (and skipped by every later
request), and the rest of the batch is delivered, so the step count never changes. A batch
whose every sample kills its worker stops the feed with PoisonBatchError naming shard and keys.
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
from selfsup.pipeline.batch import KILLED, BatchMaker, FeedSpec
from selfsup.pipeline.workers import (MAX_LOST, IsolatedWorker, RayNodes, ResultLost, StreamLost, WorkerDied,
                                      first_line, kill, local_call, local_init, ray_deaths)

log = logging.getLogger(__name__)
BACKENDS = ("ray", "local", "inline")
MAX_DEATHS = 2  # worker deaths while making one batch before it is isolated sample by sample


class PoisonBatchError(RuntimeError):
    """A micro-batch whose samples all kill the worker making them (or that kills it even without them)."""


@dataclass
class _Request:
    epoch: int
    index: int
    consumed_after: int  # the data position once this batch is consumed
    slot: int
    handle: Any = None
    deaths: int = 0  # workers that died while this request was theirs
    lost: int = 0  # times its made batch was lost with a node


class BatchFeed:
    """Micro-batches for one rank, prefetched from streams; `state_dict()` is the data position."""

    def __init__(self, spec: FeedSpec, rank: int = 0, world: int = 1, streams: int = 2, prefetch: int = 2,
                 backend: str = "ray", stream_cpus: float = 1.0,
                 stream_resources: Optional[Mapping[str, float]] = None,
                 quarantine_url: Optional[str] = None, max_deaths: int = MAX_DEATHS) -> None:
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
        if max_deaths < 1:
            raise ValueError(f"max_deaths={max_deaths} must be at least 1")
        self.max_deaths = max_deaths
        self._seen_quarantine: set[tuple] = set()
        self._killers: set[tuple[str, str]] = set()  # (shard URL, key) of samples that kill their worker
        self.epoch, self.consumed = 0, 0
        self._req_epoch, self._req_consumed = 0, 0
        self._pending: collections.deque[_Request] = collections.deque()
        self._sent = 0
        self.wait_s, self.batches, self.last_wait_s = 0.0, 0, 0.0
        self.restarts, self.quarantined, self.isolated = 0, 0, 0
        self._workers: list[Any] = []
        self._node_refs: list[Any] = []  # per stream: the ref of its node id
        self.nodes = RayNodes()  # nodes that failed under the streams (ray backend)
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
        if req.deaths >= self.max_deaths:
            return None  # isolated when consumed, never sent to a stream again
        killers = frozenset(self._killers)
        if self.backend == "ray":
            return self._workers[req.slot].batch.remote(req.epoch, req.index, killers)
        if self.backend == "local":
            assert self._pool is not None
            try:
                return self._pool.submit(local_call, "make", req.epoch, req.index, killers)
            except BrokenProcessPool as e:  # a process died since the last result: seen as a death when consumed
                failed: Future[Any] = Future()
                failed.set_exception(e)
                return failed
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
        if self.backend == "inline":  # a sample that kills this process kills the caller: no isolation
            assert self._inline is not None
            return self._inline.make(req.epoch, req.index, frozenset(self._killers))
        while req.deaths < self.max_deaths:
            try:
                return self._get(req.handle, self._workers[req.slot] if self._workers else None,
                                 self._node_refs[req.slot] if self._node_refs else None,
                                 f"micro-batch {req.index} of epoch {req.epoch} (stream {req.slot})")
            except ResultLost as e:  # not the batch's fault: make it again (on a new stream if its node went)
                req.lost += 1
                if req.lost > MAX_LOST:
                    raise RuntimeError(f"micro-batch {req.index} of epoch {req.epoch} was lost {req.lost} times "
                                       f"({e}): nodes keep failing") from None
                if isinstance(e, StreamLost):
                    self.restarts += 1
                    log.warning("stream %d was lost making micro-batch %d of epoch %d (%s); starting a new one "
                                "and re-sending its requests", req.slot, req.index, req.epoch, e)
                    self._restart(req.slot)
                else:
                    log.warning("micro-batch %d of epoch %d was lost with its node (%s); making it again",
                                req.index, req.epoch, e)
                    req.handle = self._submit(req)
            except WorkerDied as e:
                self.restarts += 1
                if self.backend == "ray":  # an actor makes its requests in order: the oldest one killed it
                    req.deaths += 1
                    lost = [r for r in self._pending if r.slot == req.slot]
                else:  # one pool: any running request may have killed it; each broken one is counted
                    lost = list(self._pending)
                    for r in lost:
                        r.deaths += 1
                log.warning("stream %d died making micro-batch %d of epoch %d (death %d of %d for this batch: %s);"
                            " restarting it and re-sending %d request(s)", req.slot, req.index, req.epoch,
                            req.deaths, self.max_deaths, e, len(lost))
                self._restart(req.slot)
        return self._isolate(req)

    def _get(self, handle: Any, stream: Any = None, node_ref: Any = None, what: str = "a request") -> dict[str, Any]:
        """The result of a request sent to `stream` (ray) or the pool: WorkerDied if its worker died
        making it on a live node, StreamLost if the stream went with its node, ResultLost if the result did.
        A long wait is logged with its likely cause (a stream no node can take yet, a slow read)."""
        if self.backend == "ray":
            from ray.exceptions import ObjectLostError

            try:
                return self.nodes.get(handle, what, node_ref, {"CPU": self.stream_cpus, **(self.stream_resources or {})})
            except ray_deaths() as e:
                raise self.nodes.judge(e, stream, node_ref) from None
            except ObjectLostError as e:
                raise ResultLost(first_line(e)) from None
        try:
            return handle.result()
        except BrokenProcessPool as e:
            raise WorkerDied(f"local stream process died: {e}") from None

    def _restart(self, slot: int) -> None:
        if self.backend == "ray":
            self._replace_stream(slot)
        else:
            self._restart_pool()

    # ------------------------------------------------------------ isolation

    def _isolate(self, req: _Request) -> dict[str, Any]:
        """Make a batch that keeps killing its worker in a fresh worker of its own, sample by sample."""
        where = f"micro-batch {req.index} of epoch {req.epoch}"
        self.isolated += 1
        log.warning("%s killed its worker %d times: making it sample by sample in an isolated worker",
                    where, req.deaths)
        with IsolatedWorker(self) as iso:
            keys = iso.call("keys", req.epoch, req.index)
            if keys is None:
                raise PoisonBatchError(f"{where}: the worker dies even listing its samples (shard indexes)")
            for slot, ident in enumerate(keys):
                if tuple(ident) not in self._killers and iso.call("check", req.epoch, req.index, slot) is None:
                    log.error("sample %s of %s kills the worker making it: quarantined", ident[1],
                              storage.redact_url(ident[0]))
                    self._killers.add(tuple(ident))
            bad = [tuple(k) for k in keys if tuple(k) in self._killers]
            names = "; ".join(f"{storage.redact_url(s)} {k}" for s, k in bad[:20])
            if bad and len(bad) == len(keys):
                raise PoisonBatchError(f"{where}: every one of its {len(keys)} samples kills the worker making "
                                       f"it: {names}")
            if bad and self.spec.on_error == "raise":
                raise PoisonBatchError(f"{where}: {len(bad)} sample(s) kill the worker making them "
                                       f"(data.on_error=raise): {names}")
            batch = iso.call("make", req.epoch, req.index, frozenset(self._killers))
            if batch is None:
                raise PoisonBatchError(f"{where} kills its worker even without the samples found to kill it "
                                       f"({names or 'none'}): check the shard's storage and the worker's memory")
            return batch

    # ------------------------------------------------------------ workers

    def _start_workers(self) -> None:
        if self.backend == "ray":
            for _ in range(self.num_streams):
                worker, node_ref = self.nodes.start(self)
                self._workers.append(worker)
                self._node_refs.append(node_ref)
        elif self.backend == "local":
            self._pool = ProcessPoolExecutor(self.num_streams, mp_context=get_context("spawn"),
                                             initializer=local_init, initargs=(self.spec,))
        else:
            self._inline = BatchMaker(self.spec)

    def _replace_stream(self, slot: int) -> None:
        kill(self._workers[slot])
        self._workers[slot], self._node_refs[slot] = self.nodes.start(self)
        for r in self._pending:
            if r.slot == slot:
                r.handle = self._submit(r)

    def _restart_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = ProcessPoolExecutor(self.num_streams, mp_context=get_context("spawn"),
                                         initializer=local_init, initargs=(self.spec,))
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
            for w in self._workers:
                kill(w)
            self._workers, self._node_refs = [], []
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "BatchFeed":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------ quarantine

    def _load_seen_quarantine(self) -> None:
        """Records already written (a resumed run writes none twice) and the samples known to kill workers."""
        assert self.quarantine_url
        if not storage.exists(self.quarantine_url, self.spec.storage_options):
            return
        urls = {storage.redact_url(s.url): s.url for s in self.spec.snapshot.shards}  # records hold redacted URLs
        for line in storage.read_text(self.quarantine_url, self.spec.storage_options).splitlines():
            try:
                rec = json.loads(line)
                self._seen_quarantine.add((rec["epoch"], rec["shard"], rec["key"]))
                if rec.get("error") == KILLED and rec["shard"] in urls:
                    self._killers.add((urls[rec["shard"]], rec["key"]))
            except (ValueError, KeyError, TypeError):
                continue

    def _record_quarantine(self, records: list[dict[str, Any]]) -> None:
        for rec in records:
            ident = (rec["epoch"], storage.redact_url(rec["shard"]), rec["key"])
            log.warning("quarantined %s in %s: %s", rec["key"], storage.redact_url(rec["shard"]), rec["error"])
            if self.quarantine_url and ident not in self._seen_quarantine:
                self._seen_quarantine.add(ident)
                storage.append_line(self.quarantine_url, json.dumps(
                    {**rec, "shard": storage.redact_url(rec["shard"]), "rank": self.rank}), self.spec.storage_options)

    def stats(self) -> dict[str, float]:
        """Data stall so far: seconds waited, batches taken, the last wait, stream restarts, quarantined,
        batches isolated sample by sample."""
        return {"wait_s": self.wait_s, "batches": self.batches, "last_wait_s": self.last_wait_s,
                "restarts": self.restarts, "quarantined": self.quarantined, "isolated": self.isolated}
