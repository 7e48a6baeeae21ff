"""TensorBoard event files under `<run>/tb/`: written whole in a local folder, then uploaded once.

An event file on object storage can never grow (an object cannot be appended to, and rewriting
a growing object per step costs O(steps²)), so each flush writes the scalars gathered since the
last one into a new, complete event file and uploads it under a name no other flush uses:

    <run>/tb/events.out.tfevents.<unix time>.<host>.<pid>.<n>

TensorBoard reads every event file of a folder in name order as one run:
`tensorboard --logdir <run>/tb` (or `--logdir <runs>` for several runs).
"""
from __future__ import annotations

import itertools
import math
import os
import tempfile
from typing import Any, Iterable, Mapping, Optional, Sequence

from selfsup.pipeline import storage
from selfsup.trainers import run_folder

# metrics-line keys that are not scalars to plot
NOT_SCALARS = ("step", "time", "epoch", "horizon", "warning")
_seq = itertools.count()

Scalar = tuple[str, float, int, float]  # (tag, value, step, unix time)


def train_scalars(lines: Iterable[Mapping[str, Any]]) -> list[Scalar]:
    """`train/<key>` scalars of metrics lines (loss, lr, samples_per_s, stall_pct, emb_spread, …)."""
    out = []
    for m in lines:
        for key, value in m.items():
            if key not in NOT_SCALARS and isinstance(value, (int, float)) and math.isfinite(value):
                out.append((f"train/{key}", float(value), int(m["step"]), float(m.get("time", 0.0))))
    return out


def eval_scalars(rows: Sequence[Mapping[str, Any]], step: int) -> list[Scalar]:
    """`eval/<set>/<target>/<method>/<encoder>` accuracies of result rows, at the checkpoint's `step`
    (baselines too, so the pretrained curve is drawn against them)."""
    return [(f"eval/{r['eval_set']}/{r['target']}/{r['method']}/{r['encoder']}", float(r["accuracy"]), step,
             float(r["time"])) for r in rows]


def write_event_file(run: str, scalars: Sequence[Scalar], options: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """Write `scalars` into one new event file under `<run>/tb/`; returns its URL (None when empty)."""
    if not scalars:
        return None
    from tensorboardX import SummaryWriter

    suffix = f".{os.getpid()}.{next(_seq)}"
    with tempfile.TemporaryDirectory(prefix="selfsup-tb-") as tmp:
        writer = SummaryWriter(logdir=tmp, filename_suffix=suffix, max_queue=len(scalars) + 1, flush_secs=3600)
        try:
            for tag, value, step, walltime in scalars:
                writer.add_scalar(tag, value, step, walltime=walltime or None)
        finally:
            writer.close()
        (name,) = os.listdir(tmp)
        url = run_folder.tb_url(run, name)
        storage.upload_file(os.path.join(tmp, name), url, options)
    return url
