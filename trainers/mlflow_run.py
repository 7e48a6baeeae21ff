"""MLflow tracking (the optional extra `selfsup[mlflow]`): `train.mlflow_uri` names the tracking server.

Rank 0's metrics writer (trainers/recorder.py) logs the run's config as params once, every metrics
line as metrics by step, and at the end of a training session the last checkpoint's encoder
(`encoder/encoder.pt` with its `meta.json`) as artifacts. `<run>/mlflow.json` records the MLflow
run, so `--resume` goes on logging into it. Storage options never become params, and
credential-named or credential-shaped values are dropped or masked as in config.yaml.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any, Iterator, Mapping, Optional, Sequence

from selfsup.pipeline import storage
from selfsup.trainers import checkpoint as ck
from selfsup.trainers import run_folder
from selfsup.trainers.tbevents import train_scalars

log = logging.getLogger(__name__)
EXTRA = "pip install 'selfsup[mlflow]'"
NOT_PARAMS = ("storage", "cluster.env")  # fsspec options and environment: never tracked, secret or not
MAX_PARAM = 6000  # MLflow's limit on a param value
BATCH = 100  # params per log_batch call (MLflow's limit)


def require_mlflow(uri: str) -> Any:
    """The mlflow module; ValueError naming the extra when `train.mlflow_uri` is set without it."""
    try:
        import mlflow
    except ImportError:
        raise ValueError(f"train.mlflow_uri={storage.redact(uri)} is set but MLflow is not installed: "
                         f"{EXTRA} (or unset train.mlflow_uri)") from None
    return mlflow


def flat_params(config: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, value) of a config as plain data (secrets already stripped), less NOT_PARAMS."""
    for key, value in config.items():
        name = f"{prefix}{key}"
        if name in NOT_PARAMS:
            continue
        if isinstance(value, Mapping) and value:
            yield from flat_params(value, name + ".")
        else:
            yield name, str(value)[:MAX_PARAM]


class MlflowSink:
    """A metrics sink logging to one MLflow run (created, or found again through `<run>/mlflow.json`)."""

    fatal = False

    def __init__(self, uri: str, experiment: str, run: str, config: Mapping[str, Any],
                 options: Optional[Mapping[str, Any]] = None) -> None:
        require_mlflow(uri)
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        self.run, self.options = run, options
        self.client = MlflowClient(tracking_uri=uri)
        self.last_checkpoint: Optional[str] = None
        known = run_folder.read_mlflow_run(run, options)
        if known is not None:
            try:
                self.client.update_run(known, status="RUNNING")
                self.run_id = known
                return
            except MlflowException as e:  # e.g. another tracking server than the run's first session used
                log.warning("MLflow run %s of %s cannot be continued (%s); starting a new one", known,
                            storage.redact_url(run), str(e).splitlines()[0][:200])
        found = self.client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        name = storage.redact_url(run).rstrip("/").rsplit("/", 1)[-1]
        self.run_id = self.client.create_run(exp_id, run_name=name,
                                             tags={"selfsup.run": storage.redact_url(run)}).info.run_id
        self._log_params(config)
        run_folder.write_mlflow_run(run, uri, self.run_id, options)

    def _log_params(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in flat_params(config)]
        for i in range(0, len(params), BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + BATCH])

    def write(self, lines: Sequence[Mapping[str, Any]]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(tag, value, int(1000 * (t or time.time())), step)
                   for tag, value, step, t in train_scalars(lines)]
        for i in range(0, len(metrics), 1000):  # MLflow's limit per call
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def checkpoint(self, url: str) -> None:
        self.last_checkpoint = url

    def flush(self) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        if self.last_checkpoint is not None:
            with tempfile.TemporaryDirectory(prefix="selfsup-mlflow-") as tmp:
                for name in (ck.ENCODER, ck.META):
                    with open(os.path.join(tmp, name), "wb") as f:
                        f.write(storage.read_bytes(storage.join(self.last_checkpoint, name), options=self.options))
                self.client.log_artifacts(self.run_id, tmp, "encoder")
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
