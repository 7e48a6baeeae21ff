"""The training engine shared by `selfsup pretrain` and `selfsup retrain`: `train(cfg, options)`.

It takes the run folder's trainer lease (a second live trainer of the same folder is refused),
freezes the data snapshot into the run folder, writes the resolved config and status, runs the
loop (a TorchTrainer on the current Ray cluster, or the same loop in this process), shows a live
progress line from the run's status, and marks the run finished, stopped (resumable) or failed.

While training, the lease is renewed from this process and read by the workers every log step:
a stop asked through it (`TrainOptions.stop_when`, e.g. a retrain that lost its own lease) makes
every rank checkpoint and stop at the same step (state `stopped`); a lease taken by another
trainer (this process stopped renewing, e.g. partitioned) makes them stop at once without
writing anything more, and `train` raises RunTaken.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

from selfsup.jobs.cluster.objectstore import StoreTotals
from selfsup.jobs.common import ensure_ray
from selfsup.pipeline import lease as leases
from selfsup.pipeline import storage
from selfsup.pipeline.config import to_dict
from selfsup.trainers import run_folder as rf
from selfsup.trainers import scaling
from selfsup.trainers.config import PretrainConfig
from selfsup.trainers.mlflow_run import require_mlflow

log = logging.getLogger(__name__)


class RunTaken(RuntimeError):
    """Another trainer took this run folder's lease: this one stopped without writing anything more."""


@dataclass(frozen=True)
class TrainOptions:
    """How to run training: where, from which state, until when, how loudly."""

    resume: bool = False  # continue from the run folder's latest complete checkpoint
    use_ray: bool = True  # False: one worker in this process, local-process streams
    address: Optional[str] = None  # Ray cluster address (default $RAY_ADDRESS, else a local cluster)
    stop_after: Optional[int] = None  # stop at this step with a checkpoint (the schedule spans train.steps)
    quiet: bool = False  # no progress line
    allow_plan_change: bool = False  # resume under other data settings, from the start of the next epoch
    stop_when: Optional[threading.Event] = None  # once set, the workers checkpoint and stop (state stopped)
    stop_reason: str = "a stop was asked"  # why, for the status and the logs
    lease_seconds: float = 60.0  # the trainer lease's expiry: how long a dead trainer blocks the folder
    wait_for_folder_s: float = 0.0  # how long to wait for another live trainer of the folder to end


@dataclass(frozen=True)
class TrainResult:
    """How a training call ended: finished or stopped (resumable), at which step, with which checkpoint."""

    state: str
    step: int
    loss: Optional[float]
    checkpoint: Optional[str]

    @property
    def stopped(self) -> bool:
        """Whether the run stopped before its schedule ended (resume it to go on)."""
        return self.state == rf.STOPPED


def train(cfg: PretrainConfig, options: TrainOptions = TrainOptions()) -> TrainResult:
    """Prepare the run folder, train, and mark the run; a failure marks it failed and is raised again."""
    cfg = dataclasses.replace(cfg, run=storage.full_url(cfg.run))  # workers run in other folders
    if cfg.train.mlflow_uri:  # before anything starts: the extra is missing here, so on the workers too
        require_mlflow(cfg.train.mlflow_uri)
    if not options.use_ray:
        cfg = local_config(cfg)
    cfg = scaling.resolve(cfg, cfg.scaling.num_workers)  # per-GPU recipe → this world's lr and steps
    storage.check_writable(cfg.run, cfg.storage_options)
    with TrainerLease(cfg, options) as held:
        resume_from, new_plan = prepare_run(cfg, options.resume, options.allow_plan_change)
        progress = Progress(cfg, quiet=options.quiet)
        progress.start()
        store = None
        try:
            if options.use_ray:
                store = train_on_ray(cfg, resume_from, options.address, options.stop_after, new_plan, held.ident)
            else:
                train_here(cfg, resume_from, options.stop_after, new_plan, held.ident)
        except BaseException as e:
            progress.stop()
            if held.lost:
                raise held.taken() from e
            mark_failed(cfg, e)
            raise
        progress.stop()
        if held.lost:
            raise held.taken()
        return finish(cfg, held.stop_reason, store)


class TrainerLease:
    """This trainer's hold on `<run>/trainer.lease`: one live trainer per run folder.

    Entering takes the lease (waiting up to `wait_for_folder_s` for another live trainer to end,
    then ValueError naming it), renews it from a thread, and writes `stop` into it once
    `options.stop_when` is set; leaving releases it. Storage without conditional writes (e.g.
    memory://) gets no lease: a warning says a second trainer would not be refused.
    """

    def __init__(self, cfg: PretrainConfig, options: TrainOptions) -> None:
        self.cfg, self.options = cfg, options
        self.url = rf.trainer_lease_url(cfg.run)
        self.lease: Optional[leases.Lease] = None
        self.stop_reason: Optional[str] = None
        self._stack = contextlib.ExitStack()
        self._done = threading.Event()
        try:
            leases.check_supported(self.url)
        except ValueError:
            log.warning("%s: no conditional writes on this storage, so a second trainer of this run folder "
                        "would not be refused", storage.redact_url(cfg.run))
            return
        self.lease = leases.Lease(self.url, options.lease_seconds, cfg.storage_options)

    @property
    def ident(self) -> Optional[dict[str, str]]:
        """What the workers watch: the lease's URL and this trainer's owner id (None without a lease)."""
        return {"url": self.url, "owner": self.lease.owner} if self.lease else None

    @property
    def lost(self) -> bool:
        """Whether another trainer took the lease while this one trained."""
        if self.lease is None:
            return False
        if self.lease.lost.is_set():
            return True
        body = self.lease.read()
        return body is None or body.get("owner") != self.lease.owner

    def taken(self) -> RunTaken:
        holder = (self.lease.read() if self.lease else None) or {}
        return RunTaken(f"run folder {storage.redact_url(self.cfg.run)} was taken over by another trainer "
                        f"({holder.get('owner', 'unknown')}) after this one could not renew its lease; this "
                        "trainer stopped without writing anything more")

    def __enter__(self) -> "TrainerLease":
        if self.lease is None:
            return self
        deadline = time.monotonic() + self.options.wait_for_folder_s
        while (taken := self.lease.acquire()) is None:
            if time.monotonic() >= deadline:
                holder = self.lease.holder() or {}
                expires = float(holder.get("expires", time.time())) - time.time()
                raise ValueError(f"run folder {storage.redact_url(self.cfg.run)} is being trained by another "
                                 f"trainer ({holder.get('owner', 'unknown')}, its lease renewed until "
                                 f"{max(expires, 0):.0f} s from now): wait for it to end, or choose another run=...")
            time.sleep(1.0)
        if taken.took_over:
            log.warning("took over run folder %s from trainer %s, which stopped renewing its lease",
                        storage.redact_url(self.cfg.run), taken.previous.get("owner"))
        self._stack.enter_context(self.lease.renewing())
        if self.options.stop_when is not None:
            thread = threading.Thread(target=self._watch, name="trainer-stop", daemon=True)
            thread.start()
            self._stack.callback(thread.join, 5)
            self._stack.callback(self._done.set)
        return self

    def _watch(self) -> None:
        assert self.options.stop_when is not None and self.lease is not None
        while not self._done.is_set():
            if self.options.stop_when.wait(0.5):
                self.stop_reason = self.options.stop_reason
                try:
                    self.lease.update(stop=self.stop_reason)
                    log.warning("asked the workers to checkpoint and stop: %s", self.stop_reason)
                except (leases.LeaseLost, OSError) as e:
                    log.error("could not ask the workers to stop (%s); they stop when the lease is lost", e)
                return

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()
        if self.lease is not None:
            self.lease.release()


def local_config(cfg: PretrainConfig) -> PretrainConfig:
    """The config for training without Ray: one worker, local-process streams instead of Ray ones."""
    backend = "local" if cfg.data.backend == "ray" else cfg.data.backend
    return dataclasses.replace(cfg, scaling=dataclasses.replace(cfg.scaling, num_workers=1),
                               data=dataclasses.replace(cfg.data, backend=backend))


def prepare_run(cfg: PretrainConfig, resume: bool, allow_plan_change: bool = False) -> tuple[Optional[str], bool]:
    """Snapshot the data, write config.yaml and status; returns the checkpoint to resume from and
    whether it resumes under a new plan (from the start of the next epoch)."""
    from selfsup.pipeline.batch import check_targets
    from selfsup.pipeline.snapshot import snapshot_for_run
    from selfsup.trainers import checkpoint as ck

    opts = cfg.storage_options
    latest = ck.latest_checkpoint(cfg.run, opts)
    if latest and not resume:
        raise ValueError(f"run folder {storage.redact_url(cfg.run)} already has checkpoints (latest "
                         f"{latest.rsplit('/', 1)[-1]}); pass --resume to continue it, or choose another run=...")
    if resume and latest is None:
        print(f"selfsup pretrain: no complete checkpoint in {storage.redact_url(cfg.run)}; starting from step 0",
              file=sys.stderr)
    changes = ck.plan_changes(ck.read_meta(latest, opts), to_dict(cfg)) if resume and latest else []
    if changes and not allow_plan_change and latest:
        raise ValueError(f"run folder {storage.redact_url(cfg.run)} was trained to {latest.rsplit('/', 1)[-1]} "
                         f"under other data settings ({'; '.join(changes)}): resuming would skip or repeat "
                         "samples. Resume with the run's settings (its config.yaml), or pass "
                         "--allow-plan-change to go on with the new ones from the start of the next epoch")
    if changes:
        print(f"selfsup pretrain: data settings changed ({'; '.join(changes)}); resuming from the start of "
              "the next epoch under the new plan", file=sys.stderr)
    snap = snapshot_for_run(cfg.run, cfg.data.sources, cfg.data.modality, opts,
                            rebuild=any(c.startswith("data.sources") for c in changes))
    check_targets(snap, opts)
    rf.write_config(cfg.run, cfg, opts)
    rf.write_status(cfg.run, rf.RunStatus(rf.RUNNING, step=0, steps=cfg.train.steps, shards=len(snap.shards),
                                          samples=snap.n_samples), opts)
    print(f"selfsup pretrain: run {storage.redact_url(cfg.run)}: {cfg.objective.name} on {cfg.data.modality}, "
          f"{len(snap.shards)} shards / {snap.n_samples} samples, {cfg.scaling.num_workers} worker(s), "
          f"{cfg.train.steps} steps", file=sys.stderr)
    print(f"selfsup pretrain: hyper-parameters: "
          f"{scaling.describe(scaling.hyper_parameters(cfg, cfg.scaling.num_workers))}", file=sys.stderr)
    return (latest if resume else None), bool(changes)


def train_here(cfg: PretrainConfig, resume_from: Optional[str], stop_after: Optional[int] = None,
               new_plan: bool = False, lease: Optional[dict[str, str]] = None) -> None:
    """The loop in this process (no Ray)."""
    from selfsup.trainers.loop import run_training
    from selfsup.trainers.reporting import LocalReporter

    run_training(cfg, 0, 1, LocalReporter(cfg.run, cfg.storage_options), resume_from, stop_after, new_plan,
                 lease)


def local_cpus(cfg: PretrainConfig) -> float:
    """Logical CPUs a local Ray needs for the workers and their streams."""
    s, d = cfg.scaling, cfg.data
    return s.num_workers * (s.cpus_per_worker + (d.streams * d.stream_cpus if d.backend == "ray" else 0)) + 1


def train_on_ray(cfg: PretrainConfig, resume_from: Optional[str], address: Optional[str],
                 stop_after: Optional[int] = None, new_plan: bool = False,
                 lease: Optional[dict[str, str]] = None) -> Optional[StoreTotals]:
    """TorchTrainer over train_loop_per_worker with checkpoints under RUN/checkpoints/; returns the
    cluster's object store figures with spill and restore counted over the fit (None if unknown)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from selfsup.trainers import checkpoint as ck
    from selfsup.trainers.loop import train_loop_per_worker

    ensure_ray(address, local_cpus(cfg))
    fs, path = storage.arrow_filesystem(cfg.run, cfg.storage_options)
    s = cfg.scaling
    import ray

    # Ray Train records train_loop_config in its run settings (the dashboard's state actor, export
    # events): it gets the config without secrets, and the workers get the whole config (storage
    # credentials, URL passwords) from the object store, which nothing records
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "cfg_with_secrets": ray.put(to_dict(cfg, secrets=True)),
                           "resume_from": resume_from, "stop_after": stop_after, "new_plan": new_plan,
                           "lease": lease},
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker={"CPU": s.cpus_per_worker, **s.resources_per_worker}),
        run_config=RunConfig(name=ck.CHECKPOINTS, storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=s.max_failures)),
    )
    before = StoreTotals.now()
    trainer.fit()
    after = StoreTotals.now()
    return after.since(before) if after else None


def mark_failed(cfg: PretrainConfig, error: BaseException) -> None:
    """Write a `failed` status naming the error (secrets redacted) at the last logged step."""
    try:
        last = rf.last_metrics(cfg.run, cfg.storage_options)
    except (OSError, ValueError):
        last = {}
    rf.write_status(cfg.run, rf.RunStatus(rf.FAILED, step=last.get("step", 0), steps=cfg.train.steps,
                                          loss=last.get("loss"),
                                          error=storage.redact(f"{type(error).__name__}: {error}")),
                    cfg.storage_options)


def finish(cfg: PretrainConfig, stop_reason: Optional[str] = None,
           store: Optional[StoreTotals] = None) -> TrainResult:
    """Mark the run finished (or stopped, resumable, with `stop_reason` if a stop was asked) and print
    where its checkpoints are, and what the run spilled from Ray's object stores (`store`)."""
    from selfsup.trainers import checkpoint as ck

    opts = cfg.storage_options
    latest = ck.latest_checkpoint(cfg.run, opts)
    logged = rf.read_metrics(cfg.run, opts)
    last = logged[-1] if logged else {}
    stalls = [m["stall_pct"] for m in logged if m.get("stall_pct") is not None]
    stall = sum(stalls) / len(stalls) if stalls else None  # the mean over the logged steps
    step = int(last.get("step", cfg.train.steps))
    stopped = step < (last.get("horizon") or cfg.train.steps)  # a time-fitted schedule ends at its horizon
    result = TrainResult(rf.STOPPED if stopped else rf.FINISHED, step, last.get("loss"), latest)
    why = stop_reason if stopped else None
    rf.write_status(cfg.run, rf.RunStatus(result.state, step=step, steps=cfg.train.steps, loss=result.loss,
                                          samples_per_s=last.get("samples_per_s"), stall_pct=stall,
                                          checkpoint=latest and storage.redact_url(latest),
                                          warning=why and f"stopped: {why}",
                                          object_store=store.to_dict() if store else None), opts)
    if store is not None:
        print(f"selfsup pretrain: {store.describe()}", file=sys.stderr)
    print(f"selfsup pretrain: {'stopped at' if stopped else 'finished'} {step} steps{f' ({why})' if why else ''}, "
          f"loss {last.get('loss', float('nan')):.4f}; "
          + (f"data stall {stall:.1f}% (mean over logged steps); " if stall is not None else "")
          + f"checkpoint {storage.redact_url(latest) if latest else '(none)'}", file=sys.stderr)
    return result


class Progress:
    """A live progress line from the run's status (one line per update when not a terminal)."""

    def __init__(self, cfg: PretrainConfig, quiet: bool = False, period: float = 2.0) -> None:
        self.cfg, self.quiet, self.period = cfg, quiet, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._last_step, self._warned = -1, ""

    def start(self) -> None:
        """Start showing the line (nothing when quiet)."""
        if not self.quiet:
            self._thread.start()

    def stop(self) -> None:
        """Stop the line and end it."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
            if sys.stderr.isatty():
                print(file=sys.stderr)

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            try:
                st = rf.read_status(self.cfg.run, self.cfg.storage_options)
            except (OSError, ValueError):
                continue
            if st is not None:
                self.show(st)

    def show(self, st: rf.RunStatus) -> None:
        """Print the line for one status (unless its step was shown already or it has no loss yet)."""
        if st.step == self._last_step or st.loss is None:
            return
        self._last_step = st.step
        line = (f"step {st.step}/{st.steps}  loss {st.loss:.4f}  "
                f"{st.samples_per_s or 0:.0f} samples/s  stall {st.stall_pct or 0:.1f}%")
        tty = sys.stderr.isatty()
        print(("\r" + line.ljust(78)) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
        if st.warning and st.warning != self._warned:
            self._warned = st.warning
            print(f"\nwarning: {st.warning}", file=sys.stderr)
