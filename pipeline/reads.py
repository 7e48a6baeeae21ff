"""A batch maker's ranged reads: run a few at once, in order, and count them.

`ordered_reads` runs the reads of a micro-batch's segments on a small thread pool (so a stream
keeps several ranged reads in flight on object storage) while the calling thread consumes their
results in the original order, decoding each as soon as its bytes are there. Only reads run on
the pool: decoding stays on the calling thread, whose OpenCV/torch thread settings are untouched.
`ReadCounter` says how many reads were in flight at once and how many overlapped a decode.
"""
from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

T = TypeVar("T")
READ_THREAD = "selfsup-read"  # the pool's thread name prefix (tests check none is left behind)


@contextlib.contextmanager
def ordered_reads(read: Callable[..., T], calls: Sequence[tuple], concurrency: int) -> Iterator[Iterator[T]]:
    """Yield an iterator of `read(*c)` for each c of `calls`, in order, with up to `concurrency` running at once.

    concurrency 1 reads each when the iterator reaches it, in the calling thread (no pool). Otherwise
    every call is submitted at once; leaving the block (also by an error) cancels those not begun and
    joins the pool's threads, so a failed read raises its own error and leaves no thread behind.
    """
    n = min(concurrency, len(calls))
    if n <= 1:
        yield (read(*c) for c in calls)
        return
    pool = ThreadPoolExecutor(n, thread_name_prefix=READ_THREAD)
    try:
        futures = [pool.submit(read, *c) for c in calls]
        yield (f.result() for f in futures)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class ReadCounter:
    """A maker's ranged reads: how many, bytes, seconds, the most in flight at once, and how many
    overlapped decoding (a sample was being decoded when the read began, or one began while it ran)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reads = self.bytes = self.in_flight = self.max_in_flight = self.overlapped = 0
        self.decoding = self.decodes = 0  # samples being decoded now; decodes begun so far
        self.seconds = self.decode_cpu_s = 0.0  # seconds reading; CPU seconds of the decoding threads

    def begin(self) -> tuple[float, int]:
        """A read begins: returns the token `end` takes."""
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return time.perf_counter(), self.decodes - (self.decoding > 0)

    def end(self, token: tuple[float, int], nbytes: int) -> None:
        """A read ends (`token` from `begin`) with `nbytes` read."""
        t0, decodes_before = token
        with self._lock:
            self.in_flight -= 1
            self.reads, self.bytes = self.reads + 1, self.bytes + nbytes
            self.seconds += time.perf_counter() - t0
            self.overlapped += self.decodes > decodes_before

    @contextlib.contextmanager
    def decode(self) -> Iterator[None]:
        """The block decodes a sample (reads running meanwhile overlap decode)."""
        with self._lock:
            self.decoding += 1
            self.decodes += 1
        t0 = time.thread_time()
        try:
            yield
        finally:
            cpu = time.thread_time() - t0
            with self._lock:
                self.decoding -= 1
                self.decode_cpu_s += cpu

    def stats(self) -> dict[str, float]:
        """The counts so far (JSON-ready), with the CPU seconds spent decoding (`decode_cpu_s`: samples'
        decode and views, the kernel's work) and by this whole process (`process_cpu_s`): their ratio
        is the share of a stream's CPU that goes to the kernel, whatever share of the machine it got."""
        return {"reads": self.reads, "bytes": self.bytes, "read_s": self.seconds,
                "max_in_flight": self.max_in_flight, "overlapped_decode": self.overlapped,
                "decode_cpu_s": self.decode_cpu_s, "process_cpu_s": time.process_time()}
