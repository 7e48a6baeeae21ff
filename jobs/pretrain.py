"""`selfsup pretrain CONFIG [key=value ...]`: DDP pretraining on the current Ray cluster.

The driver freezes the data snapshot into the run folder, writes the resolved config, starts a
TorchTrainer (or, with --no-ray, the same loop in this process) and prints a live progress
line from `<run>/status.json`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
from typing import Any, Optional

from selfsup.jobs.common import ensure_ray
from selfsup.pipeline import storage
from selfsup.pipeline.config import load_config, to_dict, to_yaml


def add_parser(sub: Any) -> None:
    """Register `selfsup pretrain`."""
    p = sub.add_parser("pretrain", help="pretrain an encoder with a self-supervised objective",
                       description="Pretrain on the current Ray cluster (RAY_ADDRESS or --address; a local "
                                   "one otherwise). CONFIG is a YAML file (see jobs/configs/); key=value "
                                   "overrides win, e.g. train.steps=200 scaling.num_workers=2 run=s3://b/runs/x.",
                       epilog="Checkpoints land in RUN/checkpoints/step-N/ (state.pt, encoder.pt, meta.json); "
                              "metrics in RUN/metrics.jsonl; state in RUN/status.json.")
    p.add_argument("config", metavar="CONFIG", help="YAML config (path or URL)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=3e-4")
    p.add_argument("--resume", action="store_true",
                   help="continue the run folder from its latest complete checkpoint at its exact data position")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else start a local one)")
    p.add_argument("--no-ray", action="store_true",
                   help="run the same loop in this process without Ray (one worker; local-process streams)")
    p.add_argument("--stop-after", type=int, metavar="STEP",
                   help="stop at this step with a checkpoint (the schedule still spans train.steps); "
                        "continue later with --resume, e.g. in preemptible time slots")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Load and check the config, prepare the run folder, train, report."""
    from selfsup.trainers.config import PretrainConfig, validate

    cfg = validate(load_config(PretrainConfig, args.config, args.overrides))
    cfg = dataclasses.replace(cfg, run=storage.full_url(cfg.run))  # workers run in other folders
    if args.no_ray:
        cfg = dataclasses.replace(cfg, scaling=dataclasses.replace(cfg.scaling, num_workers=1),
                                  data=dataclasses.replace(cfg.data, backend="local" if cfg.data.backend == "ray"
                                                           else cfg.data.backend))
    resume_from = prepare_run(cfg, args.resume)
    progress = Progress(cfg, quiet=args.quiet)
    progress.start()
    try:
        if args.no_ray:
            train_here(cfg, resume_from, args.stop_after)
        else:
            train_on_ray(cfg, resume_from, args.address, args.stop_after)
    except BaseException as e:
        progress.stop()
        set_status(cfg, "failed", error=storage.redact(f"{type(e).__name__}: {e}"))
        if isinstance(e, (KeyboardInterrupt, ValueError, FileNotFoundError)):
            raise
        print(f"selfsup pretrain: failed: {storage.redact(str(e))[:2000]}", file=sys.stderr)
        return 1
    progress.stop()
    last = last_metrics(cfg)  # a time-fitted schedule (train.time_schedule) ends at its horizon
    return finish(cfg, stopped=last.get("step", cfg.train.steps) < (last.get("horizon") or cfg.train.steps))


def prepare_run(cfg: Any, resume: bool) -> Optional[str]:
    """Snapshot the data, write config.yaml and status; returns the checkpoint to resume from."""
    from selfsup.pipeline.snapshot import SourceSpec, snapshot_for_run
    from selfsup.trainers import checkpoint as ck

    opts = cfg.storage_options
    storage.check_writable(cfg.run, opts)
    latest = ck.latest_checkpoint(cfg.run, opts)
    if latest and not resume:
        raise ValueError(f"run folder {storage.redact_url(cfg.run)} already has checkpoints (latest "
                         f"{latest.rsplit('/', 1)[-1]}); pass --resume to continue it, or choose another run=...")
    if resume and latest is None:
        print(f"selfsup pretrain: no complete checkpoint in {storage.redact_url(cfg.run)}; starting from step 0",
              file=sys.stderr)
    sources = [SourceSpec(s.url, s.split, s.weight, s.name) for s in cfg.data.sources]
    snap = snapshot_for_run(cfg.run, sources, cfg.data.modality, opts)
    storage.write_text(storage.join(cfg.run, "config.yaml"), to_yaml(cfg), opts)
    set_status(cfg, "running", step=0, shards=len(snap.shards), samples=snap.n_samples)
    print(f"selfsup pretrain: run {storage.redact_url(cfg.run)}: {cfg.objective.name} on {cfg.data.modality}, "
          f"{len(snap.shards)} shards / {snap.n_samples} samples, {cfg.scaling.num_workers} worker(s), "
          f"{cfg.train.steps} steps", file=sys.stderr)
    return latest if resume else None


def set_status(cfg: Any, state: str, **fields: Any) -> None:
    """Write `<run>/status.json`."""
    body = {"state": state, "steps": cfg.train.steps, "updated": time.time(), **fields}
    storage.write_text(storage.join(cfg.run, "status.json"), json.dumps(body), cfg.storage_options)


def train_here(cfg: Any, resume_from: Optional[str], stop_after: Optional[int] = None) -> None:
    """The loop in this process (no Ray)."""
    from selfsup.trainers.loop import run_training
    from selfsup.trainers.reporting import LocalReporter

    run_training(cfg, 0, 1, LocalReporter(cfg.run, cfg.storage_options), resume_from, stop_after)


def local_cpus(cfg: Any) -> float:
    """Logical CPUs a local Ray needs for the workers and their streams."""
    s, d = cfg.scaling, cfg.data
    return s.num_workers * (s.cpus_per_worker + (d.streams * d.stream_cpus if d.backend == "ray" else 0)) + 1


def train_on_ray(cfg: Any, resume_from: Optional[str], address: Optional[str],
                 stop_after: Optional[int] = None) -> None:
    """TorchTrainer over train_loop_per_worker with checkpoints under RUN/checkpoints/."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from selfsup.trainers.loop import train_loop_per_worker

    ensure_ray(address, local_cpus(cfg))
    fs, path = storage.arrow_filesystem(cfg.run, cfg.storage_options)
    s = cfg.scaling
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg, secrets=True), "resume_from": resume_from,
                           "stop_after": stop_after},
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker={"CPU": s.cpus_per_worker, **s.resources_per_worker}),
        run_config=RunConfig(name="checkpoints", storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=s.max_failures)),
    )
    trainer.fit()


def finish(cfg: Any, stopped: bool = False) -> int:
    """Mark the run finished (or stopped, resumable) and print where its checkpoints are."""
    from selfsup.trainers import checkpoint as ck

    opts = cfg.storage_options
    latest = ck.latest_checkpoint(cfg.run, opts)
    last = last_metrics(cfg)
    set_status(cfg, "stopped" if stopped else "finished", step=last.get("step", cfg.train.steps), loss=last.get("loss"),
               checkpoint=latest and storage.redact_url(latest))
    print(f"selfsup pretrain: {'stopped at' if stopped else 'finished'} {last.get('step', cfg.train.steps)} steps, loss {last.get('loss', float('nan')):.4f}; "
          f"checkpoint {storage.redact_url(latest) if latest else '(none)'}", file=sys.stderr)
    return 0


def last_metrics(cfg: Any) -> dict[str, Any]:
    """The last line of `<run>/metrics.jsonl` ({} when there is none)."""
    url = storage.join(cfg.run, "metrics.jsonl")
    if not storage.exists(url, cfg.storage_options):
        return {}
    lines = [ln for ln in storage.read_text(url, cfg.storage_options).splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else {}


class Progress:
    """A live progress line from `<run>/status.json` (one line per update when not a terminal)."""

    def __init__(self, cfg: Any, quiet: bool = False, period: float = 2.0) -> None:
        self.cfg, self.quiet, self.period = cfg, quiet, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._last_step, self._warned = -1, ""

    def start(self) -> None:
        if not self.quiet:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
            if sys.stderr.isatty():
                print(file=sys.stderr)

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.show(json.loads(storage.read_text(storage.join(self.cfg.run, "status.json"),
                                                       self.cfg.storage_options)))
            except (OSError, ValueError):
                continue

    def show(self, st: dict[str, Any]) -> None:
        step = int(st.get("step", 0))
        if step == self._last_step or "loss" not in st:
            return
        self._last_step = step
        line = (f"step {step}/{st.get('steps')}  loss {st['loss']:.4f}  "
                f"{st.get('samples_per_s', 0):.0f} samples/s  stall {st.get('stall_pct', 0):.1f}%")
        tty = sys.stderr.isatty()
        print(("\r" + line.ljust(78)) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
        if st.get("warning") and st["warning"] != self._warned:
            self._warned = st["warning"]
            print(f"\nwarning: {st['warning']}", file=sys.stderr)
