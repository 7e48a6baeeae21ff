"""Rank 0's metrics recorder: the step hands each metrics line to a bounded queue and goes on;
one background thread writes the lines to the run folder, TensorBoard and MLflow.

Storage is never on the step's critical path (a slow or retrying PUT delays the writer, not the
step; a full queue, `MAX_QUEUED` lines behind, holds the step back rather than grow without end),
and no other rank ever touches it. Lines that arrive while the writer is busy are written
together: one append to `<run>/metrics.jsonl` (pipeline/linelog.py keeps it O(lines) on object
storage) and one replace of `status.json` per batch.

`flush()` returns once everything recorded before it is stored (the loop flushes before each
checkpoint is reported, so a run resumed from a checkpoint has every metrics line up to it) and
raises a failure of the run folder's sink (TensorBoard and MLflow failures are logged: they
never stop training). `close()` flushes and stops the writer; `close(discard=True)` stops it
without writing anything more (the run folder was taken over by another trainer).
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Mapping, Optional, Protocol, Sequence

from selfsup.trainers import run_folder
from selfsup.trainers import tbevents

log = logging.getLogger(__name__)

MAX_QUEUED = 1024  # lines waiting for the writer before `record` blocks
_LINE, _CHECKPOINT, _FLUSH, _STOP = "line", "checkpoint", "flush", "stop"


class Sink(Protocol):
    """Where the writer thread puts metrics lines."""

    fatal: bool  # a failure stops the run (raised by the next flush); otherwise it is logged

    def write(self, lines: Sequence[Mapping[str, Any]]) -> None:
        """Take lines (in step order); may keep them until `flush`."""

    def checkpoint(self, url: str) -> None:
        """A complete checkpoint exists at `url`."""

    def flush(self) -> None:
        """Store everything taken so far."""

    def close(self, failed: bool) -> None:
        """Flush and end: the run's training session is over (`failed`: it raised)."""


class RunFolderSink:
    """`<run>/metrics.jsonl` (one append per batch of lines) and `<run>/status.json` (the last line's)."""

    fatal = True

    def __init__(self, run: str, steps: int, options: Optional[Mapping[str, Any]] = None) -> None:
        self.run, self.steps, self.options = run, steps, options

    def write(self, lines: Sequence[Mapping[str, Any]]) -> None:
        run_folder.append_metrics(self.run, lines, self.options)
        last = lines[-1]
        run_folder.write_status(self.run, run_folder.running_status(last["step"], self.steps, last), self.options)

    def checkpoint(self, url: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self, failed: bool) -> None:
        pass


class TensorBoardSink:
    """`train/…` scalars, one new event file under `<run>/tb/` per flush (trainers/tbevents.py)."""

    fatal = False

    def __init__(self, run: str, options: Optional[Mapping[str, Any]] = None) -> None:
        self.run, self.options = run, options
        self.pending: list[tbevents.Scalar] = []

    def write(self, lines: Sequence[Mapping[str, Any]]) -> None:
        self.pending += tbevents.train_scalars(lines)

    def checkpoint(self, url: str) -> None:
        pass

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        tbevents.write_event_file(self.run, pending, self.options)

    def close(self, failed: bool) -> None:
        self.flush()


class MetricsRecorder:
    """A bounded queue of metrics lines and the thread that hands them to the sinks."""

    def __init__(self, sinks: Sequence[Sink], max_queued: int = MAX_QUEUED) -> None:
        self.sinks = list(sinks)
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(max_queued)
        self._error: Optional[BaseException] = None
        self._warned: set[int] = set()
        self._discard = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="metrics-writer", daemon=True)
        self._thread.start()

    def record(self, line: Mapping[str, Any]) -> None:
        """Queue one metrics line (a dict with step and loss); returns at once unless the queue is full."""
        if "step" not in line or "loss" not in line:
            raise ValueError(f"a metrics line needs step and loss, got {sorted(line)}")
        self._queue.put((_LINE, dict(line)))

    def checkpoint(self, url: str) -> None:
        """Tell the sinks that the checkpoint at `url` is complete (MLflow logs its encoder at close)."""
        self._queue.put((_CHECKPOINT, url))

    def flush(self) -> None:
        """Wait until everything recorded so far is stored; raise a failure of a fatal sink."""
        self._wait(_FLUSH)
        self._raise()

    def close(self, discard: bool = False, failed: bool = False) -> None:
        """Flush and stop the writer; idempotent. `discard`: stop without writing what is queued;
        `failed`: training raised (a sink failure is then logged, not raised over the first error)."""
        if self._closed:
            return
        self._closed, self._discard = True, discard
        self._wait(_STOP, failed)
        if not failed:
            self._raise()
        elif self._error is not None:
            log.error("metrics were not all stored: %s", self._error)

    def _wait(self, kind: str, failed: bool = False) -> None:
        done = threading.Event()
        self._queue.put((kind, (done, failed)))
        while not done.wait(1.0):
            if not self._thread.is_alive():
                raise RuntimeError("the metrics writer thread ended unexpectedly; metrics may be missing")

    def _raise(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while batch[-1][0] == _LINE and len(batch) < MAX_QUEUED:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            lines = [payload for kind, payload in batch if kind == _LINE]
            kind, payload = batch[-1]
            if lines and not self._discard:
                self._each("write", lines)
            if kind == _CHECKPOINT and not self._discard:
                self._each("checkpoint", payload)
            elif kind == _FLUSH:
                self._each("flush")
                payload[0].set()
            elif kind == _STOP:
                if not self._discard:
                    self._each("close", payload[1])
                payload[0].set()
                return

    def _each(self, method: str, *args: Any) -> None:
        for i, sink in enumerate(self.sinks):
            try:
                getattr(sink, method)(*args)
            except Exception as e:  # noqa: BLE001 - storage and tracking clients raise many types
                if sink.fatal:
                    self._error = self._error or e
                elif i not in self._warned:
                    self._warned.add(i)
                    log.warning("%s failed (%s: %s); training goes on without it", type(sink).__name__,
                                type(e).__name__, str(e)[:300])
