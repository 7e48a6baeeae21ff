"""The pretraining loop: `train_loop_per_worker(config)` for Ray Train's TorchTrainer.

Batches come from BatchFeed (never a torch DataLoader). Each optimizer step takes `accum`
micro-batches; the learning rate is a pure function of the step, and the torch RNG is reseeded
from (seed, step, rank) every step, so a resumed run repeats the uninterrupted one exactly.
With `train.time_schedule` the schedule instead ends where the measured pace meets
`train.time_limit_minutes` (budgeted training: a schedule that anneals fully within the budget
beats a longer one cut off), so the learning rate then depends on the machine's speed.
`run_training(cfg, rank, world, reporter)` is the same loop without Ray (the local reporter
writes checkpoints straight to storage), for single machines and GPU checks.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from typing import Any, Mapping, Optional

import torch
from torch import nn

from selfsup.pipeline import storage
from selfsup.pipeline.batch import FeedSpec
from selfsup.pipeline.config import from_dict, to_dict
from selfsup.pipeline.feed import BatchFeed
from selfsup.pipeline.seeding import stable_hash
from selfsup.pipeline.snapshot import Snapshot, load_snapshot
from selfsup.trainers import checkpoint as ck
from selfsup.trainers import run_folder, scaling
from selfsup.trainers.config import PretrainConfig, config_digest
from selfsup.trainers.inputs import applied_norm, eval_sample
from selfsup.trainers.objectives import OBJECTIVES, Objective, make_objective
from selfsup.trainers.objectives.base import as_module
from selfsup.trainers.mlflow_run import MlflowSink
from selfsup.trainers.optim import build_optimizer, lr_at, set_lr
from selfsup.trainers.recorder import MetricsRecorder, RunFolderSink, Sink, TensorBoardSink
from selfsup.trainers.reporting import LocalReporter, RayReporter, Reporter
from selfsup.trainers.speedups import compile_model, ddp_options, set_cudnn_benchmark, to_channels_last
from selfsup.trainers.staging import DeviceStager, Stager, default_staging
from selfsup.trainers.steptimer import StepTimer

log = logging.getLogger(__name__)


def train_loop_per_worker(config: Mapping[str, Any]) -> None:
    """Ray Train entry: config = {"cfg": PretrainConfig as a dict (secrets stripped), "cfg_with_secrets":
    an object ref to the whole dict (or absent), "resume_from": URL or None, "stop_after": step or None}."""
    import ray
    import ray.train

    ctx = ray.train.get_context()
    show_logs()
    whole = config.get("cfg_with_secrets")
    cfg = from_dict(PretrainConfig, ray.get(whole) if whole is not None else config["cfg"])
    reporter = RayReporter(cfg.run, cfg.storage_options)
    run_training(cfg, ctx.get_world_rank(), ctx.get_world_size(), reporter, config.get("resume_from"),
                 config.get("stop_after"), bool(config.get("new_plan")), config.get("lease"))


def show_logs() -> None:
    """selfsup's INFO lines on a Ray worker's stderr (its log file; a submitted job's log too): Ray
    configures only its own loggers there."""
    logger = logging.getLogger("selfsup")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def build_objective(cfg: PretrainConfig, data_size: Optional[int] = None) -> Objective:
    """The objective with its backbone, initialized from the run's seed; `data_size` (the run snapshot's
    sample count) becomes `num_classes` of objectives sized by their data (Exemplar-CNN's surrogate classes)."""
    torch.manual_seed(cfg.train.seed)
    o = cfg.objective
    args = dict(o.args)
    if getattr(OBJECTIVES.get(o.name), "sized_by_data", False) and data_size is not None:
        args.setdefault("num_classes", data_size)
    return make_objective(o.name, modality=cfg.data.modality, backbone=o.backbone,
                          backbone_args=dict(o.backbone_args), **args)


def saw_labels(cfg: PretrainConfig, objective: Objective) -> bool:
    """Whether the pretrained encoder saw labels: a label-using objective (S4L) and a labeled source."""
    return bool(getattr(objective, "uses_labels", False)) and any(s.target for s in cfg.data.sources)


def feed_spec(cfg: PretrainConfig, objective: Objective, snapshot: Optional[Snapshot] = None) -> FeedSpec:
    """What the streams make for this run: the snapshot (default: the run folder's), plan parameters,
    modality and masks."""
    d = cfg.data
    snap = snapshot if snapshot is not None else load_snapshot(cfg.run, cfg.storage_options)
    return FeedSpec(snap, d.batch_size, dict(d.modality_args),
                    seed=cfg.train.seed, train=True, mix=d.mix, run_length=d.run_length,
                    mask=objective.mask_spec(), on_error=d.on_error, storage_options=cfg.storage_options,
                    index_cache_bytes=int(d.index_cache_mb * 2**20), read_concurrency=d.read_concurrency)


def wrap_model(objective: nn.Module, world: int, in_ray: bool,
               ddp: Optional[Mapping[str, Any]] = None) -> tuple[nn.Module, torch.device]:
    """DDP through Ray's prepare_model on 2+ workers (`ddp`: its keyword arguments); plain module otherwise."""
    if in_ray:
        import ray.train.torch

        device = ray.train.torch.get_device()
        if world > 1:
            return ray.train.torch.prepare_model(objective, parallel_strategy_kwargs=dict(ddp or {}) or None), device
        return objective.to(device), device
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return objective.to(device), device


def run_training(cfg: PretrainConfig, rank: int, world: int, reporter: Reporter,
                 resume_from: Optional[str] = None, stop_after: Optional[int] = None,
                 new_plan: bool = False, lease: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
    """Train to cfg.train.steps (or stop, checkpointed, at `stop_after`) from scratch or a checkpoint;
    `new_plan`: the checkpoint's data position belongs to other data settings, so the data starts at
    the next epoch (the model, optimizer and step continue); `lease`: {"url", "owner"} of the trainer
    lease to watch every log step (a stop asked there: checkpoint and stop; lost: stop at once)."""
    cfg = scaling.resolve(cfg, world)  # the recipe's per-GPU values → this world's lr and steps
    opts, t = cfg.storage_options, cfg.train
    snapshot = load_snapshot(cfg.run, opts)
    objective = build_objective(cfg, snapshot.n_samples)
    to_channels_last(as_module(objective), t.channels_last)
    model, device = wrap_model(as_module(objective), world, isinstance(reporter, RayReporter),
                               ddp_options(t.ddp_bucket_view, t.ddp_static_graph))
    set_cudnn_benchmark(device, t.cudnn_benchmark)
    model = compile_model(model, t.compile, t.compile_backend)
    core = objective  # the module inside `model` (DDP wraps it, .to() returns it)
    optimizer = build_optimizer(t.optimizer, core.param_groups(t.weight_decay), t.lr, t.weight_decay,
                                tuple(t.betas), t.momentum, fused=t.fused_adamw)
    recorder = open_recorder(cfg) if rank == 0 else None  # metrics go to storage off the step, from rank 0
    feed: Optional[BatchFeed] = None
    try:
        feed = BatchFeed(feed_spec(cfg, core, snapshot), rank, world, cfg.data.streams, cfg.data.prefetch,
                         cfg.data.backend, cfg.data.stream_cpus, cfg.data.stream_resources or None,
                         quarantine_url=run_folder.quarantine_url(cfg.run), max_deaths=cfg.data.max_worker_deaths)
        step = restore(reporter.restore_point() or resume_from, core, optimizer, feed, opts, rank)
        if new_plan and resume_from and step == int(ck.read_meta(resume_from, opts)["step"]):  # not a later
            # checkpoint of this session (Ray Train restarting the workers): those are under the new plan
            position = feed.state_dict()
            feed.load_state_dict({"epoch": position["epoch"] + (1 if position["consumed"] else 0), "consumed": 0})
            log.info("rank %d: new data plan, starting at epoch %d", rank, feed.state_dict()["epoch"])
        if step == 0 and cfg.train.init_from:
            warm_start(cfg.train.init_from, core, opts, rank)
        until = min(cfg.train.steps, stop_after) if stop_after else cfg.train.steps
        log.info("rank %d of %d: training from step %d to %d on %s", rank, world, step, until, device)
        watch = LeaseWatch(lease["url"], lease["owner"], opts) if lease else None
        last = _steps(cfg, rank, world, model, core, optimizer, feed, device, reporter, step, until, watch, recorder)
    except BaseException:
        if recorder is not None:
            recorder.close(failed=True)  # what was recorded is stored; the first error stays the one raised
        raise
    finally:
        if feed is not None:
            feed.close()
    if recorder is not None:
        recorder.close()
    return last


def open_recorder(cfg: PretrainConfig) -> MetricsRecorder:
    """Rank 0's metrics writer: the run folder, and TensorBoard and MLflow when configured."""
    t, opts = cfg.train, cfg.storage_options
    sinks: list[Sink] = [RunFolderSink(cfg.run, t.steps, opts)]
    if t.tensorboard:
        sinks.append(TensorBoardSink(cfg.run, opts))
    if t.mlflow_uri:
        sinks.append(MlflowSink(t.mlflow_uri, t.mlflow_experiment, cfg.run, to_dict(cfg), opts))
    return MetricsRecorder(sinks)


def restore(ckpt: Optional[str], core: Objective, optimizer: torch.optim.Optimizer, feed: BatchFeed,
            opts: Optional[Mapping[str, Any]], rank: int) -> int:
    """Load full state from a complete checkpoint; returns the step to continue from (0 if none)."""
    if not ckpt:
        return 0
    meta = ck.read_meta(ckpt, opts)
    if rank == 0:
        changed = ck.check_versions(meta)
        if changed:
            log.warning("resuming %s with different library versions (%s): batches or numerics may differ",
                        storage.redact_url(ckpt), ", ".join(changed))
    state = ck.load_torch(storage.join(ckpt, ck.STATE), opts)
    core.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    feed.load_state_dict(state["feed"])
    log.info("rank %d resumed from %s at step %d, data position %s", rank, storage.redact_url(ckpt),
             state["step"], state["feed"])
    return int(state["step"])


def warm_start(ckpt: str, core: Objective, opts: Optional[Mapping[str, Any]], rank: int) -> None:
    """Load only the model weights of a complete checkpoint (the optimizer and LR schedule start fresh)."""
    ck.read_meta(ckpt, opts)  # refuses incomplete checkpoints
    state = ck.load_torch(storage.join(ckpt, ck.STATE), opts)
    try:
        core.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(f"train.init_from={storage.redact_url(ckpt)} does not fit this objective/backbone "
                         f"({str(e).splitlines()[0][:200]}); warm start needs the same architecture") from None
    log.info("rank %d warm-started from %s (step %s)", rank, storage.redact_url(ckpt), state.get("step"))


def _autocast(device: torch.device, bf16: bool) -> Any:
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _micro_step(model: nn.Module, inputs: dict[str, torch.Tensor], device: torch.device, cfg: PretrainConfig,
                sync: bool) -> Any:
    """Forward and backward of one micro-batch (gradient sync only on the last of an accumulation)."""
    no_sync = getattr(model, "no_sync", None)
    ctx = no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()
    with ctx:
        with _autocast(device, cfg.train.bf16):
            out = model(inputs)
        (out.loss / cfg.train.accum).backward()
    return out


def train_step(cfg: PretrainConfig, rank: int, step: int, horizon: int, model: nn.Module, core: Objective,
               optimizer: torch.optim.Optimizer, stager: Stager, timer: StepTimer,
               device: torch.device) -> list[Any]:
    """One optimizer step over `train.accum` micro-batches; returns their LossOutputs (not yet read, so
    no host-device sync happens inside). The next micro-batch is staged once each backward is queued."""
    t = cfg.train
    torch.manual_seed(stable_hash(t.seed, "step", step, rank) % (2**63))
    set_lr(optimizer, lr_at(step, horizon, t.lr, t.warmup_steps, t.min_lr))
    outs = []
    for i in range(t.accum):
        inputs = stager.next()
        with timer.phase("fwd_bwd"):
            outs.append(_micro_step(model, inputs, device, cfg, sync=i == t.accum - 1))
        stager.prefetch()
    with timer.phase("optimizer"):
        if t.clip_grad:
            nn.utils.clip_grad_norm_(core.parameters(), t.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        core.after_step(step + 1, horizon)
    timer.step_done()
    return outs


def _steps(cfg: PretrainConfig, rank: int, world: int, model: nn.Module, core: Objective,
           optimizer: torch.optim.Optimizer, feed: BatchFeed, device: torch.device, reporter: Reporter,
           step: int, until: int, watch: Optional["LeaseWatch"] = None,
           recorder: Optional[MetricsRecorder] = None) -> dict[str, Any]:
    t = cfg.train
    window = _Window(feed)
    last: dict[str, Any] = {}
    started, first, asked = time.monotonic(), step, until
    horizon = t.steps  # the step the schedule ends at: train.steps, or what fits in the time (time_schedule)
    timer = StepTimer(device)
    stager = DeviceStager(feed, device, cfg.data.mean, cfg.data.std, default_staging(device, t.stage_batches),
                          t.channels_last, timer)
    compile_s: Optional[float] = None
    while step < until:
        t0 = time.perf_counter()
        for out in train_step(cfg, rank, step, horizon, model, core, optimizer, stager, timer, device):
            window.add(out, cfg.data.batch_size * world)
        if t.compile and compile_s is None:  # the first step compiled the objective: reported apart
            compile_s = time.perf_counter() - t0
            timer.reset()
        step += 1
        if t.time_limit_minutes and step % t.log_every == 0:
            elapsed = _elapsed(started, world)
            if elapsed > 60.0 * t.time_limit_minutes:
                if t.time_schedule:  # the time is the schedule's end: finished here, not stopped
                    horizon = step
                else:
                    log.warning("train.time_limit_minutes=%s reached at step %d: stopping with a checkpoint",
                                t.time_limit_minutes, step)
                until = step
            elif t.time_schedule:
                horizon = fitted_horizon(step, first, elapsed, 60.0 * t.time_limit_minutes, t.steps)
                until = min(asked, horizon)  # the pace estimate moves both ways
        if watch is not None and step % t.log_every == 0 and step < until:
            verdict, why = watch.agreed(rank, world)
            if verdict == LeaseWatch.STOP:
                log.warning("stopping at step %d with a checkpoint: %s", step, why)
                until = step
            elif verdict == LeaseWatch.LOST:
                log.error("stopping at step %d without a checkpoint: %s", step, why)
                if recorder is not None:
                    recorder.close(discard=True)
                return last
        ckpt_now = step % t.ckpt_every == 0 or step == until
        if step % t.log_every == 0 or ckpt_now:
            last = {**window.metrics(step, optimizer.param_groups[0]["lr"], world, t.collapse_threshold),
                    **timer.take(), **({"compile_s": compile_s} if compile_s is not None else {})}
            if t.time_schedule and t.time_limit_minutes:
                last["horizon"] = horizon
            if recorder is not None:
                recorder.record(last)
        if ckpt_now:  # every rank reports (a collective in Ray Train); only at checkpoints: a report
            # waits for the Ray Train controller's next poll (2 s by default), and metrics already
            # reach <run>/metrics.jsonl from rank 0, so a report per log step would stall every rank
            _checkpoint(cfg, rank, world, core, optimizer, stager.position, step, reporter, last, recorder)
    return last


class LeaseWatch:
    """The workers' view of the trainer lease: rank 0 reads it, every rank gets the same verdict."""

    GO, STOP, LOST = 0, 1, 2

    def __init__(self, url: str, owner: str, options: Optional[Mapping[str, Any]]) -> None:
        self.url, self.owner, self.options = url, owner, options

    def verdict(self) -> tuple[int, str]:
        """GO, STOP (a stop was asked: checkpoint and stop) or LOST (another trainer holds the folder,
        or the lease expired unrenewed: write nothing more), with the reason."""
        from selfsup.pipeline.lease import read_lease

        try:
            body = read_lease(self.url, self.options)
        except OSError as e:  # storage trouble: the lease's expiry has slack; look again next log step
            log.warning("could not read the trainer lease (%s); training on", e)
            return self.GO, ""
        if body is None or body.get("owner") != self.owner or body.get("released"):
            return self.LOST, f"the run folder's trainer lease is now held by {(body or {}).get('owner')}"
        if float(body.get("expires", 0)) < time.time():
            return self.LOST, "the trainer lease expired unrenewed (the driver is gone or cut off)"
        if body.get("stop"):
            return self.STOP, str(body["stop"])
        return self.GO, ""

    def agreed(self, rank: int, world: int) -> tuple[int, str]:
        """Rank 0's verdict on every rank (a collective when there are several)."""
        verdict, why = self.verdict() if rank == 0 else (self.GO, "")
        if world > 1 and torch.distributed.is_initialized():
            code = torch.tensor([verdict], dtype=torch.int64).to(_dist_device())
            torch.distributed.all_reduce(code, op=torch.distributed.ReduceOp.MAX)
            if int(code.item()) != verdict:
                verdict, why = int(code.item()), "rank 0 read it in the trainer lease"
        return verdict, why


def _elapsed(started: float, world: int) -> float:
    """Seconds since `started` on the slowest rank: every rank gets the same number, so ranks agree
    on stopping and on the fitted schedule (different learning rates would split the DDP replicas)."""
    took = torch.tensor([time.monotonic() - started], dtype=torch.float64)
    if world > 1 and torch.distributed.is_initialized():
        took = took.to(_dist_device())
        torch.distributed.all_reduce(took, op=torch.distributed.ReduceOp.MAX)
    return float(took.item())


def fitted_horizon(step: int, first: int, elapsed: float, limit: float, steps: int) -> int:
    """The step a time-fitted schedule ends at: where the pace so far reaches `limit` seconds.

    `first` is the step this session started at, `elapsed` the seconds since. Never past
    `steps`; before it, never before the next step (time is left, so the schedule goes on).
    """
    pace = elapsed / max(step - first, 1)  # seconds per step
    return min(steps, max(step + 1, step + int((limit - elapsed) / pace)))


class _Window:
    """Loss, throughput, stall and embedding spread since the last log line."""

    def __init__(self, feed: BatchFeed) -> None:
        self.feed = feed
        self.reset()

    def reset(self) -> None:
        self.t0, self.wait0 = time.perf_counter(), self.feed.wait_s
        self.losses: list[float] = []
        self.samples, self.spread = 0, float("nan")
        self.extra: dict[str, float] = {}

    def add(self, out: Any, samples: int) -> None:
        self.losses.append(float(out.loss.detach()))
        self.samples += samples
        self.extra = dict(out.metrics or {})
        if out.embedding is not None and out.embedding.shape[0] > 1:
            z = nn.functional.normalize(out.embedding.float(), dim=1)  # [B, D]
            self.spread = float(z.std(dim=0).mean()) * z.shape[1] ** 0.5  # 1 ≈ isotropic, 0 = collapsed

    def metrics(self, step: int, lr: float, world: int, threshold: float) -> dict[str, Any]:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        loss = torch.tensor(sum(self.losses) / max(1, len(self.losses)))
        if world > 1 and torch.distributed.is_initialized():
            loss = loss.to(_dist_device())
            torch.distributed.all_reduce(loss)
            loss = loss.cpu() / world
        m: dict[str, Any] = {"step": step, "loss": float(loss), "lr": lr, "samples_per_s": self.samples / elapsed,
             "stall_pct": 100.0 * (self.feed.wait_s - self.wait0) / elapsed, "emb_spread": self.spread,
             "epoch": self.feed.epoch, "time": time.time(),
             **{k: float(v) for k, v in self.extra.items()}}
        if self.spread == self.spread and self.spread < threshold:
            m["warning"] = (f"embedding spread {self.spread:.3f} < {threshold}: the representation may be "
                            "collapsing (lower the lr, raise the temperature, or check the augmentations)")
            log.warning(m["warning"])
        self.reset()
        return m


def _dist_device() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def _checkpoint(cfg: PretrainConfig, rank: int, world: int, core: Objective, optimizer: torch.optim.Optimizer,
                position: Mapping[str, int], step: int, reporter: Reporter, metrics: Mapping[str, Any],
                recorder: Optional[MetricsRecorder] = None) -> None:
    """Rank 0 stores the metrics so far, writes state.pt and encoder.pt, reports them, then writes
    meta.json and prunes; `position` is the data position of the batches trained on (the feed may be
    one batch ahead)."""
    if recorder is not None:  # a run resumed from this checkpoint has every metrics line up to it
        recorder.flush()
    with tempfile.TemporaryDirectory(prefix="selfsup-ckpt-") as tmp:
        local = None
        if rank == 0:
            state = {"model": core.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                     "feed": dict(position), "world": world}
            torch.save(state, os.path.join(tmp, ck.STATE))
            torch.save(core.encoder().state_dict(), os.path.join(tmp, ck.ENCODER))
            local = tmp
        reporter.report(dict(metrics), local, step)
    if rank != 0:
        return
    url = storage.join(cfg.run, ck.CHECKPOINTS, ck.step_dir_name(step))
    ck.write_meta(url, checkpoint_meta(cfg, core, step, world, position), cfg.storage_options)
    if recorder is not None:
        recorder.checkpoint(url)
    deleted = ck.prune(cfg.run, cfg.train.keep, cfg.train.keep_unevaluated, cfg.storage_options)
    for d in deleted:
        log.info("retention: deleted %s", storage.redact_url(d))


def checkpoint_meta(cfg: PretrainConfig, core: Objective, step: int, world: int,
                    position: Mapping[str, int]) -> dict[str, Any]:
    """meta.json: how to rebuild the encoder and what produced it (mean/std: the normalization the
    sample path applied, data.mean/std or the default for the media's channels; null for audio)."""
    mean, std = applied_norm(eval_sample(cfg.data.modality, cfg.data.modality_args), cfg.data.mean, cfg.data.std)
    return {"step": step, **core.encoder_spec(), "objective": cfg.objective.name,
            "objective_args": dict(cfg.objective.args), "modality": cfg.data.modality,
            "modality_args": dict(cfg.data.modality_args), "mean": mean, "std": std,
            "saw_labels": saw_labels(cfg, core),
            "config_digest": config_digest(cfg), "versions": ck.library_versions(), "world_size": world,
            "data_position": dict(position), "config": to_dict(cfg)}


__all__ = ["LocalReporter", "RayReporter", "run_training", "train_loop_per_worker"]
