"""The processes a BatchFeed makes batches in, besides its streams: the local backend's worker
functions, and the isolated worker a suspect batch is made in sample by sample (pipeline/feed.py).
"""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import TYPE_CHECKING, Any, Optional

from selfsup.pipeline.batch import BatchMaker, FeedSpec, keep_freed_memory

if TYPE_CHECKING:
    from selfsup.pipeline.feed import BatchFeed


class WorkerDied(RuntimeError):
    """The process making a request died (Ray actor lost, local pool broken)."""


def ray_deaths() -> tuple[type[BaseException], ...]:
    """Ray's errors for a request whose actor died (killed, lost with its node, or by the memory monitor)."""
    from ray.exceptions import OutOfMemoryError, RayActorError

    return RayActorError, OutOfMemoryError


class IsolatedWorker:
    """One fresh worker for one suspect batch: a ShardStream (ray) or a one-process pool (local).

    `call(method, ...)` runs a BatchMaker method there and returns its result, or None when the
    worker died doing it (a new one is started for the next call).
    """

    def __init__(self, feed: "BatchFeed") -> None:
        self.feed = feed
        self.worker: Any = None
        self._start()

    def _start(self) -> None:
        f = self.feed
        if f.backend == "ray":
            from selfsup.pipeline.stream import start_stream

            self.worker = start_stream(f.spec, f.stream_cpus, f.stream_resources)
        else:
            self.worker = ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=local_init,
                                              initargs=(f.spec,))

    def call(self, method: str, *args: Any) -> Any:
        ray_method = {"make": "batch"}.get(method, method)
        try:
            if self.feed.backend == "ray":
                return self.feed._get(getattr(self.worker, ray_method).remote(*args))  # noqa: SLF001
            return self.feed._get(self.worker.submit(local_call, method, *args))  # noqa: SLF001
        except WorkerDied:
            self.close()
            self._start()
            return None

    def close(self) -> None:
        if self.feed.backend == "ray":
            import ray

            try:
                ray.kill(self.worker)
            except Exception:  # noqa: BLE001 - already dead
                pass
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
