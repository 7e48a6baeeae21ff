"""The pretraining config schema: frozen dataclasses; YAML holds values, `a.b=v` overrides win.

    cfg = load_config(PretrainConfig, "jobs/configs/simclr_image.yaml", ["train.lr=3e-4"])

Components receive plain arguments taken from here, never the config object.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from selfsup.pipeline.config import ConfigError, to_dict
from selfsup.pipeline.snapshot import SourceSpec

OPTIMIZERS = ("adamw", "lars")
LR_SCALING = ("linear", "sqrt")
FEED_BACKENDS = ("ray", "local", "inline")
TRACKING = ("tensorboard", "mlflow_uri", "mlflow_experiment")  # train.* keys that only say where metrics go


@dataclass(frozen=True)
class DataConfig:
    """What the streams read and how they cut it into micro-batches."""

    sources: list[SourceSpec] = field(default_factory=list)  # shard locations (`selfsup shards ls`)
    modality: str = "image"
    modality_args: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 256          # micro-batch per rank
    mix: int = 4                   # shards mixed in each micro-batch
    run_length: Optional[int] = None
    streams: int = 2               # ShardStreams per trainer rank
    prefetch: int = 2              # requests in flight per stream
    stream_cpus: float = 0.5
    stream_resources: dict[str, float] = field(default_factory=dict)
    backend: str = "ray"           # ray | local | inline
    on_error: str = "quarantine"   # quarantine | raise
    max_worker_deaths: int = 2     # deaths while making one batch before it is made sample by sample
    index_cache_mb: float = 64.0   # shard indexes each stream keeps in memory (LRU, bounded in bytes)
    read_concurrency: Optional[int] = None  # ranged reads a stream keeps in flight per micro-batch (None: mix on
    # object storage, 1 for local files; set it for a network file system mounted as a local path)
    mean: Optional[list[float]] = None  # per-channel normalization of uint8 inputs (0-1 scale)
    std: Optional[list[float]] = None


@dataclass(frozen=True)
class ObjectiveConfig:
    """A registry name, its backbone and their arguments."""

    name: str = "simclr"
    backbone: str = "convnet_small"
    backbone_args: dict[str, Any] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    """Optimization, schedule, logging and checkpoint cadence."""

    steps: int = 1000              # optimizer steps in the whole run
    lr: float = 1e-3               # peak learning rate (after warmup)
    min_lr: float = 0.0
    warmup_steps: int = 0
    optimizer: str = "adamw"       # adamw | lars
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9          # LARS
    clip_grad: Optional[float] = None
    accum: int = 1                 # micro-batches per optimizer step
    seed: int = 0
    bf16: bool = True              # autocast on GPU (CPU always runs fp32)
    log_every: int = 10
    ckpt_every: int = 200
    keep: int = 3                  # complete checkpoints kept (plus the promoted one)
    # also keep every checkpoint no evaluation has marked yet: for runs with `selfsup evaluate --watch`
    # beside them; without an evaluator nothing is marked and no checkpoint is ever deleted
    keep_unevaluated: bool = False
    collapse_threshold: float = 0.05  # warn when the embedding spread falls below this
    time_limit_minutes: Optional[float] = None  # stop (checkpointed) once this much training time has passed
    # with time_limit_minutes: fit the LR/EMA schedule to the time (it anneals fully when time is up;
    # the run is finished there, `steps` becomes an upper bound) instead of being cut off mid-schedule
    time_schedule: bool = False
    init_from: Optional[str] = None   # warm start: model weights of this checkpoint at step 0 (fresh optimizer/LR)
    # TensorBoard event files under <run>/tb/ (scalars only, a few KB per flush, written off the step)
    tensorboard: bool = True
    mlflow_uri: Optional[str] = None  # MLflow tracking URI (needs `pip install 'selfsup[mlflow]'`)
    mlflow_experiment: str = "selfsup"
    # Scaling with the global batch (data.batch_size × accum × workers), as the papers do; set, these
    # derive lr, steps and warmup_steps (trainers/scaling.py; the resolved values are printed at start)
    base_lr: Optional[float] = None   # lr per `lr_batch` samples of global batch (MAE's `blr`)
    lr_scaling: str = "linear"        # linear: base_lr × global/lr_batch; sqrt: base_lr × sqrt(global/lr_batch)
    lr_batch: int = 256
    samples: Optional[int] = None     # the run's length in samples (epochs × dataset size): steps = samples / global
    warmup_samples: Optional[int] = None  # warmup in samples: warmup_steps = warmup_samples / global
    # GPU options; those that change numerics are off by default (the loop ignores them on CPU where moot)
    channels_last: bool = False       # NHWC model and inputs (ResNets on tensor cores)
    compile: bool = False             # torch.compile the objective; its compile time is reported apart
    compile_backend: str = "inductor"
    fused_adamw: bool = False         # AdamW's fused kernel where the device has one
    cudnn_benchmark: bool = False     # let cuDNN pick the fastest convolution algorithms (not deterministic)
    ddp_bucket_view: bool = False     # DDP gradient_as_bucket_view: gradients alias the all-reduce buckets
    ddp_static_graph: bool = False    # DDP static_graph (where the objective allows: accum 1, one forward a step)
    stage_batches: Optional[bool] = None  # pinned host buffers, copies one batch ahead on a side stream
    #                                     (None: on for CUDA devices, off elsewhere)


@dataclass(frozen=True)
class ScalingConfig:
    """Ray Train's ScalingConfig and FailureConfig, as plain values."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    max_failures: int = 0


@dataclass(frozen=True)
class ClusterConfig:
    """How `selfsup submit` runs this config as a Ray job: the image provides every dependency."""

    image: str = "selfsup:latest"  # the cluster nodes' container image (recorded in the job metadata)
    python: str = "python"         # interpreter on the cluster that runs `-m selfsup.jobs.cli`
    entrypoint_cpus: float = 0.0   # reserved for the driver process (0: it only coordinates)
    entrypoint_gpus: float = 0.0
    entrypoint_resources: dict[str, float] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # non-secret settings only; credentials are refused
    excludes: list[str] = field(default_factory=list)  # more working_dir excludes (gitignore syntax)


@dataclass(frozen=True)
class RetrainConfig:
    """`selfsup retrain`: where retrain runs live, how they are judged, and the lease."""

    runs: str = ""                 # runs root (default: the config's `run`, used as a folder of runs)
    eval_set: str = ""             # NAME=TRAIN_URL[,TEST_URL]; default: sources holding probe splits
    metric: str = "linear"         # knn | linear
    target: str = "cls"
    tolerance: float = 0.0         # promote unless worse than the promoted model by more than this (0-1 scale)
    min_new_samples: int = 1
    lease_seconds: float = 600.0   # a holder that stops renewing for this long is presumed dead
    steps: Optional[int] = None    # optimizer steps per retrain run (default train.steps)


@dataclass(frozen=True)
class PretrainConfig:
    """A whole pretraining run."""

    run: str = "runs/pretrain"     # run folder: a path or URL
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    storage: dict[str, Any] = field(default_factory=dict)  # fsspec options (endpoint_url, region, ...)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)

    @property
    def storage_options(self) -> Optional[dict[str, Any]]:
        """The fsspec options for storage calls: the `storage` mapping, or None when it is empty."""
        return dict(self.storage) or None


def validate(cfg: PretrainConfig) -> PretrainConfig:
    """Checks across fields that types alone cannot express; ConfigError names the key."""
    checks = [
        (cfg.data.sources, "data.sources is empty: name at least one shard location"),
        (cfg.data.batch_size >= 1, f"data.batch_size={cfg.data.batch_size} must be at least 1"),
        (cfg.data.streams >= 1, f"data.streams={cfg.data.streams} must be at least 1"),
        (cfg.data.backend in FEED_BACKENDS, f"data.backend={cfg.data.backend!r}; valid: {', '.join(FEED_BACKENDS)}"),
        (cfg.train.optimizer in OPTIMIZERS, f"train.optimizer={cfg.train.optimizer!r}; valid: {', '.join(OPTIMIZERS)}"),
        (cfg.train.steps >= 1, f"train.steps={cfg.train.steps} must be at least 1"),
        (cfg.train.lr > 0, f"train.lr={cfg.train.lr} must be positive"),
        (cfg.train.accum >= 1, f"train.accum={cfg.train.accum} must be at least 1"),
        (cfg.train.log_every >= 1, f"train.log_every={cfg.train.log_every} must be at least 1"),
        (cfg.train.ckpt_every >= 1, f"train.ckpt_every={cfg.train.ckpt_every} must be at least 1"),
        (cfg.train.keep >= 1, f"train.keep={cfg.train.keep} must be at least 1"),
        (cfg.train.warmup_steps >= 0, f"train.warmup_steps={cfg.train.warmup_steps} must not be negative"),
        (cfg.train.lr_scaling in LR_SCALING, f"train.lr_scaling={cfg.train.lr_scaling!r}; valid: {', '.join(LR_SCALING)}"),
        (cfg.train.lr_batch >= 1, f"train.lr_batch={cfg.train.lr_batch} must be at least 1"),
        (cfg.train.base_lr is None or cfg.train.base_lr > 0, f"train.base_lr={cfg.train.base_lr} must be positive"),
        (cfg.train.samples is None or cfg.train.samples >= 1, f"train.samples={cfg.train.samples} must be at least 1"),
        (cfg.train.warmup_samples is None or cfg.train.warmup_samples >= 0,
         f"train.warmup_samples={cfg.train.warmup_samples} must not be negative"),
        (not cfg.train.ddp_static_graph or cfg.train.accum == 1,
         "train.ddp_static_graph needs one forward per backward (train.accum=1): accumulation skips "
         "gradient sync on all but the last micro-batch, which a static graph does not allow for"),
        (cfg.scaling.num_workers >= 1, f"scaling.num_workers={cfg.scaling.num_workers} must be at least 1"),
        (cfg.data.max_worker_deaths >= 1, f"data.max_worker_deaths={cfg.data.max_worker_deaths} must be at least 1"),
        (cfg.data.index_cache_mb >= 0, f"data.index_cache_mb={cfg.data.index_cache_mb} must not be negative "
         "(0 keeps no index; the default is 64)"),
        (cfg.data.read_concurrency is None or cfg.data.read_concurrency >= 1,
         f"data.read_concurrency={cfg.data.read_concurrency} must be at least 1 (1 reads one shard segment at a "
         "time; leave it unset for data.mix reads in flight)"),
        ((cfg.data.mean is None) == (cfg.data.std is None), "give data.mean and data.std together"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return cfg


def config_digest(cfg: PretrainConfig) -> str:
    """A short id of everything that decides the model (secrets excluded)."""
    data = to_dict(cfg)
    data.pop("run", None)
    data.pop("cluster", None)  # where and how a run is scheduled does not decide the model
    data.pop("retrain", None)
    data["data"].pop("index_cache_mb", None)  # nor the streams' index cache (same batches)
    data["data"].pop("read_concurrency", None)  # nor how many reads they overlap (same batches)
    for key in TRACKING:  # where metrics are shown does not decide the model either
        data["train"].pop(key, None)
    return hashlib.blake2b(json.dumps(data, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()
