"""`selfsup bench train CONFIG`: the recipe's own training step, fed by the pipeline and at its ceiling.

One process, one accelerator (or the CPU), the model, optimizer and step exactly as the loop
builds and runs them (trainers/loop.py's `train_step`, the GPU options of the config):

- `fed`: micro-batches from a BatchFeed over `data.streams` local processes (`--backend local`,
  no Ray) or ShardStream actors on a local Ray (`--backend ray`), staged to the device as in
  training. Its data stall is the share of the time the step waited for the feed.
- `synthetic`: the same step on two batches already on the device, repeated: no data path, the
  ceiling an accelerator reaches with this recipe.
- `pipeline`: the feed read with no model; the CPU-seconds of this process tree (the stream
  processes, or the raylet and Ray workers) give the pipeline's samples per CPU-second at this
  recipe (decode, views, masks at this size).

Stream sizing: the cores per accelerator that keep the stall under 2% at the ceiling are
0.98 × ceiling / (samples per CPU-second); the advice adds 25% headroom and rounds up to whole
streams of `data.stream_cpus`. Each variant first runs `--warmup` untimed steps (compilation,
cuDNN autotuning, the allocator); with torch.compile their time is reported as compile_s.
On CUDA, peak GPU memory is reported per variant.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

STALL_TARGET = 0.02  # the data stall the sizing advice aims under
HEADROOM = 1.25      # streams advised above the bare need (jitter in decode times, bursts)


@dataclass(frozen=True)
class TrainBenchOptions:
    """What `selfsup bench train` measures."""

    config: str
    overrides: tuple[str, ...] = ()
    steps: int = 20                   # timed steps per variant (unless `seconds`)
    seconds: Optional[float] = None   # or: a time budget for the whole bench, shared by the variants
    warmup: int = 3                   # untimed steps before each timed variant
    backend: str = "local"            # local | ray: where the streams run
    data: Optional[str] = None        # shard location, instead of the config's data.sources


class SyntheticStager:
    """The stager's interface over batches already on the device: no data path at all."""

    def __init__(self, raw: list[dict[str, torch.Tensor]], make_inputs: Callable[[dict[str, torch.Tensor]], Any]) -> None:
        self.raw, self.make_inputs, self.i = raw, make_inputs, 0
        self.position = {"epoch": 0, "consumed": 0}

    def next(self) -> Any:
        """The next batch (cycling), normalized on the device as the fed step does."""
        self.i += 1
        return self.make_inputs(self.raw[self.i % len(self.raw)])

    def prefetch(self) -> None:
        """Nothing to fetch."""


def log(msg: str) -> None:
    """Progress and the table go to stderr, so --json leaves stdout clean."""
    print(msg, file=sys.stderr, flush=True)


def load(options: TrainBenchOptions) -> Any:
    """The config with --data and --backend applied, resolved for one worker."""
    from selfsup.pipeline.config import load_config
    from selfsup.trainers import scaling
    from selfsup.trainers.config import PretrainConfig, validate

    extra = [f"data.backend={options.backend}"]
    if options.data:
        extra.append(f"data.sources=[{{url: {options.data}, split: pretrain}}]")
    cfg = validate(load_config(PretrainConfig, options.config, [*options.overrides, *extra]))
    return scaling.resolve(cfg, 1)


class Bench:
    """The recipe's model, optimizer and step on this machine's accelerator (or CPU)."""

    def __init__(self, cfg: Any) -> None:
        from selfsup.pipeline.snapshot import build_snapshot
        from selfsup.trainers.loop import build_objective, feed_spec
        from selfsup.trainers.objectives.base import as_module
        from selfsup.trainers.optim import build_optimizer
        from selfsup.trainers.speedups import compile_model, set_cudnn_benchmark, to_channels_last

        t = cfg.train
        self.cfg = cfg
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        snapshot = build_snapshot(cfg.data.sources, cfg.data.modality, cfg.storage_options)
        self.core = build_objective(cfg, snapshot.n_samples)
        module = to_channels_last(as_module(self.core), t.channels_last).to(self.device)
        set_cudnn_benchmark(self.device, t.cudnn_benchmark)
        self.model = compile_model(module, t.compile, t.compile_backend)
        self.optimizer = build_optimizer(t.optimizer, self.core.param_groups(t.weight_decay), t.lr, t.weight_decay,
                                         tuple(t.betas), t.momentum, fused=t.fused_adamw)
        self.spec = feed_spec(cfg, self.core, snapshot)
        self.step = 0
        self.compile_s: Optional[float] = None

    def feed(self) -> Any:
        """A BatchFeed for rank 0 of 1 with the config's streams."""
        from selfsup.pipeline.feed import BatchFeed

        d = self.cfg.data
        if d.backend == "ray":
            from selfsup.jobs.common import ensure_ray

            ensure_ray(None, d.streams * d.stream_cpus + 1)
        return BatchFeed(self.spec, 0, 1, d.streams, d.prefetch, d.backend, d.stream_cpus, d.stream_resources or None)

    def run(self, stager: Any, timer: Any, steps: int, seconds: Optional[float]) -> tuple[int, float]:
        """Train `steps` steps (or for `seconds`, at least 2); returns (steps, wall seconds)."""
        from selfsup.trainers.loop import train_step

        n, t0 = 0, time.perf_counter()
        while (n < steps) if seconds is None else (n < 2 or time.perf_counter() - t0 < seconds):
            first = time.perf_counter()
            outs = train_step(self.cfg, 0, self.step, self.cfg.train.steps, self.model, self.core, self.optimizer,
                              stager, timer, self.device)
            for out in outs:
                float(out.loss.detach())  # the loop reads every loss: the same synchronization
            if self.cfg.train.compile and self.compile_s is None:
                self.compile_s = time.perf_counter() - first
            self.step, n = self.step + 1, n + 1
        self.sync()
        return n, time.perf_counter() - t0

    def sync(self) -> None:
        """Wait for the device's queued work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def memory(self) -> Optional[float]:
        """Peak GPU memory since the last call, GiB (None off CUDA)."""
        if self.device.type != "cuda":
            return None
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        torch.cuda.reset_peak_memory_stats(self.device)
        return round(peak, 2)

    def samples(self, steps: int) -> int:
        """Samples in `steps` optimizer steps."""
        return steps * self.cfg.data.batch_size * self.cfg.train.accum


def measure_fed(b: Bench, options: TrainBenchOptions, budget: Optional[float]) -> tuple[dict[str, Any], list]:
    """(a) the step fed by the pipeline; also returns two raw batches for the synthetic run."""
    from selfsup.trainers.staging import DeviceStager, default_staging
    from selfsup.trainers.steptimer import StepTimer

    d, t = b.cfg.data, b.cfg.train
    timer = StepTimer(b.device)
    with b.feed() as feed:
        stager = DeviceStager(feed, b.device, d.mean, d.std, default_staging(b.device, t.stage_batches),
                              t.channels_last, timer)
        b.run(stager, timer, options.warmup, None)
        timer.reset()
        b.memory()
        wait0 = feed.wait_s
        steps, wall = b.run(stager, timer, options.steps, budget)
        waited = feed.wait_s - wait0
        raw = [feed.next() for _ in range(2)]
    return {"samples_per_s": b.samples(steps) / wall, "steps": steps, "seconds": round(wall, 2),
            "stall_pct": 100.0 * waited / wall, "split_ms": timer.take(), "gpu_mem_gib": b.memory()}, raw


def measure_synthetic(b: Bench, raw: list, options: TrainBenchOptions, budget: Optional[float]) -> dict[str, Any]:
    """(b) the same step on batches already on the device: the ceiling."""
    from selfsup.trainers.inputs import tensor_fields
    from selfsup.trainers.staging import model_inputs
    from selfsup.trainers.steptimer import StepTimer

    d, t = b.cfg.data, b.cfg.train
    on_device = [{k: torch.from_numpy(v).to(b.device) for k, v in tensor_fields(batch).items()} for batch in raw]

    def inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return model_inputs(batch, d.mean, d.std, t.channels_last)

    timer = StepTimer(b.device)
    stager = SyntheticStager(on_device, inputs)
    b.run(stager, timer, options.warmup, None)
    timer.reset()
    b.memory()
    steps, wall = b.run(stager, timer, options.steps, budget)
    return {"samples_per_s": b.samples(steps) / wall, "steps": steps, "seconds": round(wall, 2),
            "split_ms": timer.take(), "gpu_mem_gib": b.memory()}


def measure_pipeline(b: Bench, options: TrainBenchOptions, budget: Optional[float]) -> dict[str, Any]:
    """(c) the feed alone: samples/s and samples per CPU-second of this process tree."""
    from selfsup.jobs.bench.loaders import RunClock

    with b.feed() as feed:
        for _ in range(max(1, feed.num_streams * feed.prefetch)):  # streams up and warm, as in training
            feed.next()
        # the requests in flight when the clock stops cost CPU but bring no counted samples: read many
        # times as many batches, so they weigh little
        least = 5 * feed.num_streams * feed.prefetch
        clock, n, batches = RunClock(), 0, 0
        clock.start()
        t0 = time.perf_counter()
        while (batches < max(least, options.steps * b.cfg.train.accum)) if budget is None else (
                batches < least or time.perf_counter() - t0 < budget):
            n += int(feed.next()["valid"].sum())
            batches += 1
        clock.stop()
    return {"samples_per_s": n / clock.wall, "samples_per_cpu_s": n / clock.cpu if clock.cpu else None,
            "cores": round(clock.cpu / clock.wall, 2), "other_cores": round(clock.other / clock.wall, 2),
            "batches": batches}


def advice(ceiling: float, per_cpu: Optional[float], stream_cpus: float) -> dict[str, Any]:
    """Cores per accelerator for a stall under 2% at the ceiling, and the streams that give them."""
    if not per_cpu:
        return {"cores_per_accelerator": None, "streams": None, "stream_cpus": stream_cpus}
    cores = (1 - STALL_TARGET) * ceiling / per_cpu
    return {"cores_per_accelerator": round(cores, 2), "with_headroom": round(HEADROOM * cores, 2),
            "streams": max(1, math.ceil(HEADROOM * cores / stream_cpus)), "stream_cpus": stream_cpus}


def bench_train(options: TrainBenchOptions) -> dict[str, Any]:
    """Measure fed, synthetic and pipeline-only for the config; the result dict holds figures and advice."""
    if options.backend not in ("local", "ray"):
        raise ValueError(f"--backend {options.backend!r}; valid: local, ray")
    if options.steps < 1 or options.warmup < 0 or (options.seconds is not None and options.seconds <= 0):
        raise ValueError("--steps must be at least 1, --warmup at least 0 and --seconds positive")
    cfg = load(options)
    b = Bench(cfg)
    name = torch.cuda.get_device_name(b.device) if b.device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    log(f"bench train: {cfg.objective.name} + {cfg.objective.backbone} on {cfg.data.modality}, batch "
        f"{cfg.data.batch_size}, {name}, {cfg.data.streams} {options.backend} stream(s); {b.spec.snapshot.n_samples} "
        f"samples in {len(b.spec.snapshot.shards)} shards")
    share = (lambda f: options.seconds * f) if options.seconds else (lambda f: None)
    try:
        fed, raw = measure_fed(b, options, share(0.5))
        log(f"fed:       {fed['samples_per_s']:.1f} samples/s, stall {fed['stall_pct']:.1f}%")
        synthetic = measure_synthetic(b, raw, options, share(0.25))
        log(f"synthetic: {synthetic['samples_per_s']:.1f} samples/s")
        pipeline = measure_pipeline(b, options, share(0.25))
        log(f"pipeline:  {pipeline['samples_per_s']:.1f} samples/s, {pipeline['samples_per_cpu_s'] or 0:.1f} "
            f"per CPU-second")
    finally:
        if options.backend == "ray" and "ray" in sys.modules:
            import ray

            ray.shutdown()
    result = {"config": options.config, "objective": cfg.objective.name, "backbone": cfg.objective.backbone,
              "modality": cfg.data.modality, "modality_args": dict(cfg.data.modality_args),
              "batch_size": cfg.data.batch_size, "device": name, "backend": options.backend,
              "streams": cfg.data.streams, "fed": fed, "synthetic": synthetic, "pipeline": pipeline,
              "fed_vs_synthetic": fed["samples_per_s"] / synthetic["samples_per_s"],
              "advice": advice(synthetic["samples_per_s"], pipeline["samples_per_cpu_s"], cfg.data.stream_cpus),
              "compile_s": b.compile_s, "options": {k: getattr(cfg.train, k) for k in GPU_OPTIONS}}
    log(table(result))
    return result


GPU_OPTIONS = ("bf16", "channels_last", "compile", "fused_adamw", "cudnn_benchmark", "stage_batches")


def table(r: dict[str, Any]) -> str:
    """A readable summary of one result."""
    fed, syn, pipe, adv = r["fed"], r["synthetic"], r["pipeline"], r["advice"]
    split = lambda s: " / ".join(f"{s[k]:.1f}" for k in ("data_wait_ms", "h2d_ms", "fwd_bwd_ms", "optimizer_ms"))  # noqa: E731
    lines = [f"{r['objective']} {r['backbone']} ({r['modality']}, batch {r['batch_size']}) on {r['device']}",
             f"{'':<11}{'samples/s':>11}{'stall %':>9}{'GPU GiB':>9}   step split ms: data / h2d / fwd+bwd / optimizer",
             f"{'fed':<11}{fed['samples_per_s']:>11.1f}{fed['stall_pct']:>9.1f}{fed['gpu_mem_gib'] or '':>9}   "
             f"{split(fed['split_ms'])}",
             f"{'synthetic':<11}{syn['samples_per_s']:>11.1f}{'':>9}{syn['gpu_mem_gib'] or '':>9}   {split(syn['split_ms'])}",
             f"pipeline alone: {pipe['samples_per_s']:.1f} samples/s on {pipe['cores']} cores = "
             f"{pipe['samples_per_cpu_s'] or 0:.1f} samples per CPU-second; fed/synthetic = {r['fed_vs_synthetic']:.2f}"]
    if adv["cores_per_accelerator"] is not None:
        lines.append(f"stream sizing: {adv['cores_per_accelerator']} CPU cores per accelerator keep the stall under "
                     f"{100 * STALL_TARGET:.0f}% at the ceiling; with {HEADROOM:.2f}× headroom: data.streams="
                     f"{adv['streams']} at data.stream_cpus={adv['stream_cpus']:g}")
    if r["compile_s"] is not None:
        lines.append(f"torch.compile: the first step took {r['compile_s']:.1f} s (compilation included)")
    return "\n".join(lines)

