"""Where the loop reports metrics and checkpoints: Ray Train, or straight to storage without Ray.

Both put checkpoint files under `<run>/checkpoints/step-NNNNNN/`; the loop writes meta.json
after `report` returns, so a checkpoint is complete only once every other file is stored.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional, Protocol

from selfsup.pipeline import storage
from selfsup.trainers import checkpoint as ck

log = logging.getLogger(__name__)


class Reporter(Protocol):
    """What the loop needs from its host."""

    def report(self, metrics: Mapping[str, Any], local_dir: Optional[str], step: int) -> None:
        """Publish metrics; with `local_dir`, persist its files as the step's checkpoint."""

    def restore_point(self) -> Optional[str]:
        """A complete checkpoint to continue from after a restart, or None."""


class RayReporter:
    """ray.train.report with checkpoint_dir_name=step-N; restores from ray.train.get_checkpoint()."""

    def __init__(self, run: str, options: Optional[Mapping[str, Any]] = None) -> None:
        self.run, self.options = run, options

    def report(self, metrics: Mapping[str, Any], local_dir: Optional[str], step: int) -> None:
        import ray.train

        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if local_dir is None:
            ray.train.report(clean)
            return
        ray.train.report(clean, checkpoint=ray.train.Checkpoint.from_directory(local_dir),
                         checkpoint_dir_name=ck.step_dir_name(step))

    def restore_point(self) -> Optional[str]:
        import ray.train

        found = ray.train.get_checkpoint()
        if found is None:
            return None
        name = str(found.path).rstrip("/").rsplit("/", 1)[-1]
        url = storage.join(self.run, ck.CHECKPOINTS, name)
        if storage.exists(storage.join(url, ck.META), self.options):
            return url
        latest = ck.latest_checkpoint(self.run, self.options)  # Ray's newest lacks meta.json: incomplete
        log.warning("checkpoint %s is incomplete; restoring from %s", name, latest)
        return latest


class LocalReporter:
    """Without Ray: checkpoint files are uploaded to storage; restarts are the caller's business."""

    def __init__(self, run: str, options: Optional[Mapping[str, Any]] = None,
                 on_metrics: Any = None) -> None:
        self.run, self.options, self.on_metrics = run, options, on_metrics

    def report(self, metrics: Mapping[str, Any], local_dir: Optional[str], step: int) -> None:
        if self.on_metrics is not None:
            self.on_metrics(dict(metrics))
        if local_dir is None:
            return
        url = storage.join(self.run, ck.CHECKPOINTS, ck.step_dir_name(step))
        for name in sorted(os.listdir(local_dir)):
            storage.upload_file(os.path.join(local_dir, name), storage.join(url, name), self.options)

    def restore_point(self) -> Optional[str]:
        return None
