"""Where a step's time goes: data wait, host-to-device copy, forward+backward, optimizer.

Data wait and the host side of the copy are host seconds (the training thread blocked on the
feed, or filling buffers and issuing copies). Forward+backward and the optimizer are timed with
CUDA events on the step's stream on a GPU (kernels run asynchronously, so host clocks would
misplace them; events are read once per log line, when the step's loss has synchronized
anyway), with host clocks on a CPU. Figures are milliseconds per optimizer step.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

import torch

PHASES = ("data_wait", "h2d", "fwd_bwd", "optimizer")


class StepTimer:
    """Per-phase time since the last `take()`, averaged per optimizer step."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        """Start a new window."""
        self.seconds = {p: 0.0 for p in PHASES}
        self.steps = 0
        self._events: list[tuple[str, Any, Any]] = []

    def add(self, phase: str, seconds: float) -> None:
        """Book host seconds to `phase`."""
        self.seconds[phase] += seconds

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the work issued inside the block (GPU time on CUDA, host time otherwise)."""
        if not self.cuda:
            t0 = time.perf_counter()
            yield
            self.seconds[name] += time.perf_counter() - t0
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._events.append((name, start, end))

    def step_done(self) -> None:
        """Count one optimizer step."""
        self.steps += 1

    def take(self) -> dict[str, float]:
        """`<phase>_ms` per step for the window, then a new window."""
        for name, start, end in self._events:
            end.synchronize()
            self.seconds[name] += start.elapsed_time(end) / 1000.0
        n = max(self.steps, 1)
        out = {f"{p}_ms": 1000.0 * self.seconds[p] / n for p in PHASES}
        self.reset()
        return out
