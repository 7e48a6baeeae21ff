"""Small pieces the job modules share: storage options and configs from the command line, formatting."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:
    from selfsup.trainers.config import PretrainConfig

CONFIGS = Path(__file__).resolve().parent / "configs"  # selfsup/jobs/configs: the bundled configs


def add_storage_args(p: argparse.ArgumentParser) -> None:
    """`--storage-option KEY=VALUE` (repeatable) for fsspec options such as endpoint_url or region."""
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="storage option for s3/gs (endpoint_url=..., region=..., profile=...); "
                        "credentials normally come from the AWS/GCP environment, not from here")


def storage_options(args: argparse.Namespace) -> Optional[dict[str, Any]]:
    """Options from --storage-option and $SELFSUP_STORAGE_OPTIONS (JSON), or None."""
    opts: dict[str, Any] = {}
    if os.environ.get("SELFSUP_STORAGE_OPTIONS"):
        opts.update(json.loads(os.environ["SELFSUP_STORAGE_OPTIONS"]))
    for item in getattr(args, "storage_option", []) or []:
        if "=" not in item:
            raise ValueError(f"--storage-option {item!r} must look like KEY=VALUE")
        k, v = item.split("=", 1)
        opts[k] = v
    return opts or None


def bundled_configs() -> list[str]:
    """Names of the bundled configs: `simclr_image`, …, `quality/image` (their paths under jobs/configs/)."""
    return sorted(p.relative_to(CONFIGS).with_suffix("").as_posix() for p in CONFIGS.rglob("*.yaml"))


def config_location(config: str) -> str:
    """A CONFIG argument as a loadable location: a path or URL as given, or a bundled config's file by name."""
    if "://" in config or config.lower().endswith((".yaml", ".yml")) or os.path.exists(config):
        return config
    names = bundled_configs()
    if config in names:
        return str(CONFIGS / f"{config}.yaml")
    raise FileNotFoundError(f"config {config!r} is neither a YAML file nor a bundled config; "
                            f"bundled configs: {', '.join(names)}")


def config_help() -> str:
    """The CONFIG argument's help: what it may be, with the bundled names."""
    return f"YAML config (path or URL) or a bundled config's name: {', '.join(bundled_configs())}"


def load_pretrain_config(config: str, overrides: Sequence[str],
                         options: Optional[dict[str, Any]]) -> "PretrainConfig":
    """The checked config of CONFIG (path, URL or bundled name) + overrides, with `options` (from
    --storage-option / $SELFSUP_STORAGE_OPTIONS) over its `storage` section."""
    from selfsup.pipeline.config import load_config
    from selfsup.trainers.config import PretrainConfig, validate

    cfg = validate(load_config(PretrainConfig, config_location(config), overrides, options=options))
    return dataclasses.replace(cfg, storage={**cfg.storage, **(options or {})}) if options else cfg


def human_bytes(n: float) -> str:
    """1536 → '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def in_submitted_job() -> bool:
    """Whether this process is the driver of a job submitted through the Ray Jobs API."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # set by Ray's job supervisor for the entrypoint


def ensure_ray(address: Optional[str] = None, local_cpus: float = 4) -> None:
    """Connect to --address / $RAY_ADDRESS, or start a local Ray with at least `local_cpus` logical CPUs."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:  # a submitted job's log is its driver's output: there, the workers' output joins it
        ray.init(address=address, log_to_driver=in_submitted_job())
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # address="local": a new instance of our own even where `ray start` left a cluster running on
    # this machine (plain ray.init() would join that one and refuse num_cpus); --address auto joins it
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(local_cpus + 0.999)),
             include_dashboard=False, log_to_driver=False, configure_logging=False)
