"""The run folder: the names of the files a run leaves, and typed readers and writers for them.

    <run>/config.yaml         the resolved config, without secrets      write_config / read_config
    <run>/manifest.parquet    the data snapshot (pipeline/snapshot.py)   manifest_url
    <run>/status.json         one RunStatus                              write_status / read_status
    <run>/metrics.jsonl       one line per logged step                   append_metrics / read_metrics / last_metrics
    <run>/quarantine.jsonl    undecodable samples (pipeline/feed.py)     quarantine_url
    <run>/trainer.lease       the live trainer's lease (jobs/training.py) trainer_lease_url
    <run>/tb/                 TensorBoard event files (trainers/tbevents.py) tb_url
    <run>/mlflow.json         the MLflow run this run logs to             read_mlflow_run / write_mlflow_run
    <run>/checkpoints/        trainers/checkpoint.py owns its names
    <run>/eval/               evaluation results and plots               eval_url

Only this module spells these names; every other module asks it for URLs or calls its readers.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from selfsup.pipeline import storage
from selfsup.pipeline.config import load_config, to_yaml
from selfsup.pipeline.snapshot import SNAPSHOT_FILE
from selfsup.trainers.config import PretrainConfig

CONFIG, STATUS, METRICS, QUARANTINE, EVAL = "config.yaml", "status.json", "metrics.jsonl", "quarantine.jsonl", "eval"
TRAINER_LEASE, TB, MLFLOW = "trainer.lease", "tb", "mlflow.json"
MANIFEST = SNAPSHOT_FILE

# run states: `stopped` is resumable (train.time_limit_minutes or --stop-after reached, or a stop asked
# through the trainer's lease, e.g. when a retrain lost its lease; checkpointed)
RUNNING, STOPPED, FINISHED, FAILED = "running", "stopped", "finished", "failed"
STATES = (RUNNING, STOPPED, FINISHED, FAILED)
ENDED = (STOPPED, FINISHED, FAILED)  # nothing more will be written until a --resume
UNKNOWN = "unknown"  # what a reader reports for a folder without status.json


def config_url(run: str) -> str:
    """`<run>/config.yaml`."""
    return storage.join(run, CONFIG)


def status_url(run: str) -> str:
    """`<run>/status.json`."""
    return storage.join(run, STATUS)


def metrics_url(run: str) -> str:
    """`<run>/metrics.jsonl`."""
    return storage.join(run, METRICS)


def quarantine_url(run: str) -> str:
    """`<run>/quarantine.jsonl`."""
    return storage.join(run, QUARANTINE)


def trainer_lease_url(run: str) -> str:
    """`<run>/trainer.lease`: held by the one live trainer of the run (pipeline/lease.py)."""
    return storage.join(run, TRAINER_LEASE)


def manifest_url(run: str) -> str:
    """`<run>/manifest.parquet` (written and read by pipeline/snapshot.py)."""
    return storage.join(run, MANIFEST)


def tb_url(run: str, *parts: str) -> str:
    """`<run>/tb/` or an event file in it."""
    return storage.join(run, TB, *parts)


def eval_url(run: str, *parts: str) -> str:
    """`<run>/eval/` or a file under it."""
    return storage.join(run, EVAL, *parts)


# ---------------------------------------------------------------- config.yaml

def write_config(run: str, cfg: PretrainConfig, opts: Optional[Mapping[str, Any]] = None) -> None:
    """Write the resolved config (secrets stripped) to `<run>/config.yaml`."""
    storage.write_text(config_url(run), to_yaml(cfg), opts)


def read_config(run: str, opts: Optional[Mapping[str, Any]] = None) -> Optional[PretrainConfig]:
    """The run's saved config (without storage secrets), or None when it has none."""
    url = config_url(run)
    return load_config(PretrainConfig, url, options=opts) if storage.exists(url, opts) else None


# ---------------------------------------------------------------- mlflow.json

def write_mlflow_run(run: str, tracking_uri: str, run_id: str, opts: Optional[Mapping[str, Any]] = None) -> None:
    """Record which MLflow run `<run>` logs to, so a resumed run goes on logging there."""
    storage.write_text(storage.join(run, MLFLOW), json.dumps({"tracking_uri": storage.redact(tracking_uri),
                                                              "run_id": run_id}), opts)


def read_mlflow_run(run: str, opts: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """The MLflow run id `<run>` logs to, or None when it has none yet."""
    url = storage.join(run, MLFLOW)
    if not storage.exists(url, opts):
        return None
    try:
        return str(json.loads(storage.read_text(url, opts))["run_id"])
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{storage.redact_url(url)} is damaged; delete it to start a new MLflow run") from None


# ---------------------------------------------------------------- status.json

@dataclass(frozen=True)
class RunStatus:
    """`<run>/status.json`: one schema for every writer (fields a writer does not know are None)."""

    state: str
    step: int = 0
    steps: int = 0
    loss: Optional[float] = None
    samples_per_s: Optional[float] = None
    stall_pct: Optional[float] = None
    warning: Optional[str] = None
    error: Optional[str] = None
    checkpoint: Optional[str] = None
    shards: Optional[int] = None
    samples: Optional[int] = None
    pid: Optional[int] = None
    host: Optional[str] = None
    object_store: Optional[dict[str, int]] = None  # Ray object store spill/restore over the run (jobs/cluster/objectstore.py)
    updated: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"run state {self.state!r} is not one of {', '.join(STATES)}")

    @property
    def ended(self) -> bool:
        """Whether the run is stopped, finished or failed."""
        return self.state in ENDED

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to status.json."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "RunStatus":
        """Parse a status.json object; keys this schema does not know are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def running_status(step: int, steps: int, metrics: Mapping[str, Any]) -> RunStatus:
    """The status the training loop writes with each metrics line (names the rank-0 process)."""
    return RunStatus(RUNNING, step=step, steps=steps, loss=metrics.get("loss"),
                     samples_per_s=metrics.get("samples_per_s"), stall_pct=metrics.get("stall_pct"),
                     warning=metrics.get("warning"), pid=os.getpid(), host=os.uname().nodename)


def write_status(run: str, status: RunStatus, opts: Optional[Mapping[str, Any]] = None) -> None:
    """Replace `<run>/status.json` (atomically)."""
    storage.write_text(status_url(run), json.dumps(status.to_dict()), opts)


def read_status(run: str, opts: Optional[Mapping[str, Any]] = None) -> Optional[RunStatus]:
    """The run's status, or None when the folder has no status.json."""
    url = status_url(run)
    if not storage.exists(url, opts):
        return None
    try:
        values = json.loads(storage.read_text(url, opts))
        return RunStatus.from_dict(values)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{storage.redact_url(url)} is not a valid run status ({e})") from None


def run_state(run: str, opts: Optional[Mapping[str, Any]] = None) -> str:
    """The run's state, or UNKNOWN when it has no status.json."""
    status = read_status(run, opts)
    return status.state if status is not None else UNKNOWN


# ---------------------------------------------------------------- metrics.jsonl

def append_metrics(run: str, lines: Mapping[str, Any] | Sequence[Mapping[str, Any]],
                   opts: Optional[Mapping[str, Any]] = None) -> None:
    """Append one line, or several at once, to `<run>/metrics.jsonl` (each a dict with at least step and loss)."""
    lines = [lines] if isinstance(lines, Mapping) else list(lines)
    bad = [sorted(m) for m in lines if "step" not in m or "loss" not in m]
    if bad:
        raise ValueError(f"a metrics line needs step and loss, got {bad[0]}")
    if lines:
        storage.append_line(metrics_url(run), "\n".join(json.dumps(dict(m)) for m in lines), opts)


def read_metrics(run: str, opts: Optional[Mapping[str, Any]] = None) -> list[dict[str, Any]]:
    """Every line of `<run>/metrics.jsonl` in order ([] when there is none)."""
    url = metrics_url(run)
    if not storage.exists(url, opts):
        return []
    out = []
    for n, line in enumerate(storage.read_text(url, opts).splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                raise ValueError(f"{storage.redact_url(url)} line {n} is not JSON; "
                                 "the metrics file is damaged") from None
    return out


def last_metrics(run: str, opts: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The last line of `<run>/metrics.jsonl` ({} when there is none)."""
    lines = read_metrics(run, opts)
    return lines[-1] if lines else {}
