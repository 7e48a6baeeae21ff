"""The processes a BatchFeed makes batches in, besides its streams: the local backend's worker
functions, and the isolated worker a suspect batch is made in sample by sample (pipeline/feed.py);
and RayNodes, which tells a Ray worker lost with its node from one a batch killed, for the feed's
streams, its isolated worker and evaluation's feature workers (trainers/features.py).
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import TYPE_CHECKING, Any, Mapping, Optional

from selfsup.pipeline.batch import BatchMaker, FeedSpec, keep_freed_memory

if TYPE_CHECKING:
    from selfsup.pipeline.feed import BatchFeed


log = logging.getLogger(__name__)
MAX_LOST = 5  # times one request may be lost with a node (node after node) before the feed gives up
UNREACHABLE_S = 3.0  # how long a stream Ray calls unavailable has to answer before its node is taken as lost
SUSPECT_S = 120.0  # how long new streams keep off a node that failed while Ray still lists it alive
STALL_WARN_S = 60.0  # a request not answered this long is logged, and again every STALL_REPEAT_S
STALL_REPEAT_S = 300.0


class WorkerDied(RuntimeError):
    """The process making a request died on a live node (Ray actor killed, local pool broken): the
    request may have killed it, so the death counts against it."""


class ResultLost(RuntimeError):
    """A request was lost through no fault of its own (the node holding its result or its stream went
    away): it is made again, and counts only against MAX_LOST."""


class StreamLost(ResultLost):
    """The stream making a request is gone with its node, or cannot be reached: start a new one elsewhere."""


def ray_deaths() -> tuple[type[BaseException], ...]:
    """Ray's errors for a request whose actor died (killed, lost with its node, or by the memory monitor)."""
    from ray.exceptions import OutOfMemoryError, RayActorError

    return RayActorError, OutOfMemoryError


def kill(actor: Any) -> None:
    """ray.kill, for an actor that may be dead already."""
    import ray

    try:
        ray.kill(actor)
    except Exception:  # noqa: BLE001 - it is already dead
        pass


def alive_nodes() -> set[str]:
    """Ids of the nodes Ray lists alive."""
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


class RayNodes:
    """Where a feed's streams (or evaluation's feature workers) run, and which nodes failed under them.

    A request whose stream died is judged before it is sent again. When the stream's node died, or
    the stream cannot be reached (Ray says "unavailable" for a node whose processes are gone until
    its health checks give up on it, ~10-30 s later), the request is not at fault: StreamLost, and
    new streams keep off that node while Ray still lists it alive. When the process died on a live
    node, the request may have killed it: WorkerDied, counted towards isolating it.
    """

    def __init__(self) -> None:
        self.suspects: dict[str, float] = {}  # node id -> when it failed (monotonic)

    def start(self, f: "BatchFeed") -> tuple[Any, Any]:
        """A new stream for feed `f`, kept off failed nodes, and the ref of its node id."""
        from selfsup.pipeline.stream import start_stream

        return self.started(start_stream(f.spec, f.stream_cpus, f.stream_resources, avoid=self.avoid()))

    def placement(self) -> dict[str, Any]:
        """Actor options for a new actor of any kind (it needs a `node_id` method): off failed nodes."""
        from selfsup.pipeline.stream import keep_off

        return keep_off(self.avoid())

    @staticmethod
    def started(handle: Any) -> tuple[Any, Any]:
        """The actor and the ref of its node id (asked before any request: known unless it dies starting)."""
        return handle, handle.node_id.remote()

    def avoid(self) -> list[str]:
        now = time.monotonic()
        self.suspects = {n: t for n, t in self.suspects.items() if now - t < SUSPECT_S}
        if not self.suspects:
            return []
        alive = alive_nodes()
        return [n for n in self.suspects if n in alive]  # Ray places nothing on a node it knows is dead

    def judge(self, e: BaseException, handle: Any, node_ref: Any) -> Exception:
        """StreamLost or WorkerDied for Ray's error `e` on a request to the stream `handle`."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError

        what = first_line(e)
        if not isinstance(e, (ActorDiedError, ActorUnavailableError)) or e.actor_init_failed:
            return WorkerDied(what)  # the memory monitor's kill, or a stream that cannot even start
        node = self._node(node_ref)
        if e.preempted:
            return self._lost(node, what, "its node was drained")
        if isinstance(e, ActorUnavailableError):
            if node is not None and node in self.suspects:
                return self._lost(node, what, "its node failed before")
            try:  # a live process answers; a dead one on a live node is soon reported dead
                if handle is None:
                    raise GetTimeoutError("no handle to ask")
                ray.get(handle.node_id.remote(), timeout=UNREACHABLE_S)
                return StreamLost(f"{what}; it answers again, but is replaced")
            except ActorDiedError as died:  # dead after all: judged by its node below
                what = first_line(died)
            except (ActorUnavailableError, GetTimeoutError):
                return self._lost(node, what, f"no answer within {UNREACHABLE_S:g} s")
        if node is not None and node not in alive_nodes():
            return self._lost(node, what, "its node died")
        return WorkerDied(what)

    def get(self, ref: Any, what: str, node_ref: Any, asks: Mapping[str, float],
            settings: str = "data.stream_cpus, data.stream_resources") -> Any:
        """ray.get(ref) (the result of `what`), logging why while it takes STALL_WARN_S or more: Ray
        waits without a word for a node that can take an actor, and a read can take minutes of retries."""
        import ray
        from ray.exceptions import GetTimeoutError

        waited, step = 0.0, STALL_WARN_S
        while True:
            try:
                return ray.get(ref, timeout=step)
            except GetTimeoutError:
                waited += step
                log.warning("%s: no answer after %.3g s; %s", what, waited, self.stall_note(node_ref, asks, settings))
                step = STALL_REPEAT_S

    @staticmethod
    def stall_note(node_ref: Any, asks: Mapping[str, float], settings: str) -> str:
        """Why a worker may not answer: not started (and whether any live node offers what it asks), or busy."""
        import ray

        if node_ref is not None and ray.wait([node_ref], timeout=0)[0]:
            node = RayNodes._node(node_ref) or "unknown"
            return f"its worker runs on node {node[:12]} and is still making it (a slow read retrying, or a large batch)"
        offered = ray.cluster_resources()
        short = {k: v for k, v in asks.items() if v > 0 and offered.get(k, 0.0) < v}
        if short:
            have = ", ".join(f"{k}: {offered.get(k, 0.0):g}" for k in short)
            return (f"its worker has not started: it asks for {dict(asks)}, and the cluster's live nodes offer "
                    f"{have}; it waits for a node that can take it (one the autoscaler adds, where set up; "
                    f"see `ray status`; it asks for what {settings} say)")
        return (f"its worker has not started yet: it asks for {dict(asks)}, which the cluster offers (its process "
                f"is starting, or it waits for others to free them: see `ray status`)")

    def _lost(self, node: Optional[str], what: str, why: str) -> StreamLost:
        if node is not None:
            self.suspects.setdefault(node, time.monotonic())
        return StreamLost(f"{what} ({why}: node {node[:12] if node else 'unknown'})")

    @staticmethod
    def _node(node_ref: Any) -> Optional[str]:
        import ray

        try:
            return str(ray.get(node_ref, timeout=1.0))
        except Exception:  # noqa: BLE001 - it died before it said where it runs
            return None


class IsolatedWorker:
    """One fresh worker for one suspect batch: a ShardStream (ray) or a one-process pool (local).

    `call(method, ...)` runs a BatchMaker method there and returns its result, or None when the
    worker died doing it (a new one is started for the next call).
    """

    def __init__(self, feed: "BatchFeed") -> None:
        self.feed = feed
        self.worker: Any = None
        self.node_ref: Any = None
        self._start()

    def _start(self) -> None:
        f = self.feed
        if f.backend == "ray":
            self.worker, self.node_ref = f.nodes.start(f)
        else:
            self.worker = ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=local_init,
                                              initargs=(f.spec,))

    def call(self, method: str, *args: Any) -> Any:
        """The method's result; None when the worker died making it on a live node. A worker lost with
        its node says nothing of the sample: the call is made again in a new worker."""
        ray_method = {"make": "batch"}.get(method, method)
        lost = 0
        while True:
            try:
                if self.feed.backend == "ray":
                    return self.feed._get(getattr(self.worker, ray_method).remote(*args),  # noqa: SLF001
                                          self.worker, self.node_ref, f"the isolated worker's {method}{args}")
                return self.feed._get(self.worker.submit(local_call, method, *args))  # noqa: SLF001
            except ResultLost as e:
                lost += 1
                if lost > MAX_LOST:
                    raise RuntimeError(f"the isolated worker's {method}{args} was lost {lost} times ({e}): "
                                       f"nodes keep failing") from None
                log.warning("the isolated worker's %s%s was lost (%s); making it again", method, args, e)
                if isinstance(e, StreamLost):
                    self.close()
                    self._start()
            except WorkerDied:
                self.close()
                self._start()
                return None

    def close(self) -> None:
        if self.feed.backend == "ray":
            kill(self.worker)
        else:
            self.worker.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "IsolatedWorker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_LOCAL_MAKER: Optional[BatchMaker] = None


def local_init(spec: FeedSpec) -> None:
    """Initializer of a local worker process: its one BatchMaker."""
    global _LOCAL_MAKER
    keep_freed_memory()  # a worker process that only makes batches
    _LOCAL_MAKER = BatchMaker(spec)


def local_call(method: str, *args: Any) -> Any:
    """BatchMaker.<method>(*args) in a local worker process (make, keys, check)."""
    assert _LOCAL_MAKER is not None
    return getattr(_LOCAL_MAKER, method)(*args)
