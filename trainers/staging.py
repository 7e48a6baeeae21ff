"""Micro-batches from a feed → model inputs on the device, the next one copied while the step runs.

Batches arrive as numpy arrays. Unstaged (the default off CUDA), each is copied when the step
asks for it, as `to_device` does. Staged (the default on CUDA), the arrays are copied into host
buffers that are reused step after step (pinned on CUDA, so a copy is truly asynchronous), two
sets used in turn, and their device copies are issued `non_blocking` on a side stream one batch
ahead: the loop calls `prefetch()` once its step's backward is queued, so the next batch's data
wait, host copy and transfer overlap the GPU's work. uint8 media stay uint8 until they are on the
device; normalization runs there, on the step's stream.

The feed's position runs one batch ahead of training while a batch is staged, so `position` is
the data position of the batches handed out, which is what a checkpoint must record.
"""
from __future__ import annotations

import time
from typing import Any, Mapping, Optional, Protocol, Sequence

import numpy as np
import torch

from selfsup.trainers.inputs import model_input, tensor_fields


class BatchSource(Protocol):
    """What the stager reads: BatchFeed's `next`, `state_dict` and last wait."""

    last_wait_s: float

    def next(self) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, int]: ...


class PhaseClock(Protocol):
    """Where the stager books its host time (trainers/steptimer.py's StepTimer)."""

    def add(self, phase: str, seconds: float) -> None: ...


class Stager(Protocol):
    """What the step reads its inputs from: DeviceStager, or batches already on the device (bench)."""

    def next(self) -> dict[str, torch.Tensor]: ...

    def prefetch(self) -> None: ...


class _Staged:
    """One batch on its way: device tensors (raw dtypes), the data position after it, its copy event."""

    def __init__(self, tensors: dict[str, torch.Tensor], position: dict[str, int], event: Any) -> None:
        self.tensors, self.position, self.event = tensors, position, event


class DeviceStager:
    """The step's inputs on `device` from `feed`; `staged`: reused (pinned) buffers, copies one batch ahead."""

    def __init__(self, feed: BatchSource, device: torch.device, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, staged: bool = False, channels_last: bool = False,
                 clock: Optional[PhaseClock] = None) -> None:
        self.feed, self.device, self.mean, self.std = feed, device, mean, std
        self.staged, self.channels_last, self.clock = staged, channels_last, clock
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if staged and self.cuda else None
        self._buffers: list[dict[str, torch.Tensor]] = [{}, {}]  # host buffer sets, used in turn
        self._copied: list[Any] = [None, None]  # the event after each set's last device copy
        self._turn = 0
        self._ahead: Optional[_Staged] = None
        self.position = feed.state_dict()

    def next(self) -> dict[str, torch.Tensor]:
        """The next micro-batch as the objective takes it (normalized, on the device)."""
        if not self.staged:
            batch = self._take()
            t0 = time.perf_counter()
            raw = {k: torch.from_numpy(v).to(self.device, non_blocking=True) for k, v in tensor_fields(batch).items()}
            self._book("h2d", time.perf_counter() - t0)
            self.position = self.feed.state_dict()
            return self._inputs(raw)
        if self._ahead is None:
            self.prefetch()
        assert self._ahead is not None
        staged, self._ahead = self._ahead, None
        if staged.event is not None:  # the step's stream waits for the copy, and owns the memory from now on
            main = torch.cuda.current_stream(self.device)
            main.wait_event(staged.event)
            for t in staged.tensors.values():
                t.record_stream(main)
        self.position = staged.position
        return self._inputs(staged.tensors)

    def prefetch(self) -> None:
        """Take the next micro-batch from the feed and start its copy to the device (staged only)."""
        if not self.staged or self._ahead is not None:
            return
        batch = self._take()
        position = self.feed.state_dict()
        t0 = time.perf_counter()
        host = self._fill_buffers(tensor_fields(batch))
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                tensors = {k: t.to(self.device, non_blocking=True) for k, t in host.items()}
                event = torch.cuda.Event()
                event.record(self.stream)
            self._copied[self._turn] = event
        else:
            tensors, event = {k: t.to(self.device) for k, t in host.items()}, None
        self._turn ^= 1
        self._ahead = _Staged(tensors, position, event)
        self._book("h2d", time.perf_counter() - t0)

    def _take(self) -> dict[str, Any]:
        batch = self.feed.next()
        self._book("data_wait", self.feed.last_wait_s)
        return batch

    def _fill_buffers(self, arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Copy the arrays into this turn's host buffers (made, pinned on CUDA, on first use of a shape)."""
        if self._copied[self._turn] is not None:
            self._copied[self._turn].synchronize()  # the set's previous device copy has read it
        buffers = self._buffers[self._turn]
        out = {}
        for name, value in arrays.items():
            src = torch.from_numpy(value)
            buf = buffers.get(name)
            if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
                buf = buffers[name] = torch.empty(src.shape, dtype=src.dtype, pin_memory=self.cuda)
            out[name] = buf.copy_(src)
        return out

    def _inputs(self, raw: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return model_inputs(raw, self.mean, self.std, self.channels_last)

    def _book(self, phase: str, seconds: float) -> None:
        if self.clock is not None:
            self.clock.add(phase, seconds)


def model_inputs(raw: Mapping[str, torch.Tensor], mean: Optional[Sequence[float]], std: Optional[Sequence[float]],
                 channels_last: bool = False) -> dict[str, torch.Tensor]:
    """Device tensors as they arrived (uint8 media) → the objective's inputs; 4-d images NHWC if asked."""
    out = {k: model_input(k, t, mean, std) for k, t in raw.items()}
    if channels_last:
        out = {k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 and v.is_floating_point() else v
               for k, v in out.items()}
    return out


def default_staging(device: torch.device, setting: Optional[bool]) -> bool:
    """train.stage_batches: None means staged on CUDA devices, unstaged elsewhere."""
    return device.type == "cuda" if setting is None else bool(setting)
