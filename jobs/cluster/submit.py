"""The engine of `selfsup submit pretrain|evaluate|retrain CONFIG_OR_RUN [ARGS...] --address http://HEAD:8265`.

The job runs `python -m selfsup.jobs.cli KIND ...` on the cluster through the Ray Jobs API;
dependencies come from the cluster's image (`cluster.image`, recorded in the job metadata), never
from a per-job pip install. The config is resolved here (file + overrides, checked, local paths made
absolute) and shipped without secrets in the job's working_dir, a staging folder made for the upload:

- run from a checkout (an editable install), the working_dir also holds this checkout's packages laid
  out as installed (`selfsup/`, `selfsup/pipeline/`, ...), so the job and its Ray workers import the
  code you are editing ahead of the image's copy;
- run from an installed selfsup, it holds the config alone and the image's selfsup runs it.

Credentials are never put in runtime_env env_vars, which `ray job list` shows to anyone: the
cluster's own identity supplies them.
"""
from __future__ import annotations

import argparse
import dataclasses
import getpass
import importlib
import shlex
import shutil
import socket
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from selfsup.jobs.cluster.jobclient import explain
from selfsup.jobs.common import load_pretrain_config, storage_options
from selfsup.pipeline import storage
from selfsup.trainers.config import ClusterConfig, PretrainConfig, config_digest

ROOT = Path(__file__).resolve().parents[2]  # the checkout, when this file is not an installed copy


# where each package's folder sits in a checkout (pyproject's package-dir) → where it goes in the working_dir
PACKAGE_DIRS = {"selfsup": "selfsup", "pipeline": "selfsup/pipeline", "trainers": "selfsup/trainers",
                "jobs": "selfsup/jobs"}


SHIPPED_CONFIG = "config.yaml"  # the resolved config, at the top of the job's working_dir


KINDS = {"pretrain": "selfsup.jobs.commands.pretrain", "evaluate": "selfsup.jobs.commands.evaluate", "retrain": "selfsup.jobs.commands.retrain"}


EXCLUDES = ["__pycache__", "*.pyc", ".cache", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".ipynb_checkpoints"]


SAFE_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS",
                  "RAY_AUTH_TOKEN", "HF_TOKEN", "WANDB_API_KEY")


def watch_args(eval_set: str) -> list[str]:
    """`selfsup evaluate RUN ...` arguments of the watcher that --with-eval submits beside a training job."""
    return ["--watch", "--poll", "2", "--eval-set", eval_set, "--quiet"]


def plan_job(kind: str, target: str, forwarded: list[str],
             cluster: Optional[ClusterConfig] = None) -> dict[str, Any]:
    """What to run: argv for `selfsup.jobs.cli`, the resolved config to ship (if any), cluster settings, metadata."""
    ns = parse_forwarded(kind, target, forwarded)
    if kind == "evaluate":
        cfg = resolved_config(target, []) if is_config(target) else None
        run_url = cfg.run if cfg else storage.full_url(target)
        cluster = cluster or (cfg.cluster if cfg else run_cluster(run_url))
        args = public_storage_options(absolute_eval_sets(forwarded))  # no config to carry them: argv does
        return {"kind": kind, "argv": ["evaluate", run_url, *args], "config": None,
                "cluster": cluster, "run": run_url, "local": [run_url] if storage.is_local(run_url) else [],
                "metadata": metadata(kind, run_url, cluster or ClusterConfig())}
    cfg = resolved_config(ns.config, ns.overrides, storage_options(ns))
    rest = without_storage_options(forwarded)  # baked into the shipped config, credentials stripped there
    for item in ns.overrides:
        rest.remove(item)  # baked into the shipped config
    root = (cfg.retrain.runs or cfg.run) if kind == "retrain" else cfg.run
    local = [u for u in (root, *(s.url for s in cfg.data.sources)) if storage.is_local(u)]
    return {"kind": kind, "argv": [kind, "<config>", *rest], "config": cfg, "cluster": cfg.cluster, "run": root,
            "local": local, "metadata": metadata(kind, root, cfg.cluster, cfg)}


def parse_forwarded(kind: str, target: str, forwarded: list[str]) -> argparse.Namespace:
    """Check the forwarded arguments with the command's own parser, here, before anything is submitted."""
    sub = argparse.ArgumentParser(prog="selfsup submit").add_subparsers()
    importlib.import_module(KINDS[kind]).add_parser(sub)
    return sub.choices[kind].parse_intermixed_args([target, *forwarded])  # overrides may follow options


def absolute_eval_sets(args: list[str]) -> list[str]:
    """`--eval-set NAME=URL[,URL]` values with local paths made absolute (the job runs elsewhere)."""
    out = []
    for i, a in enumerate(args):
        if a.startswith("--eval-set="):
            a = "--eval-set=" + _absolute_set(a.split("=", 1)[1])
        elif i > 0 and args[i - 1] == "--eval-set":
            a = _absolute_set(a)
        out.append(a)
    return out


def _absolute_set(value: str) -> str:
    name, sep, urls = value.partition("=")
    return f"{name}={','.join(storage.full_url(u) for u in urls.split(','))}" if sep else value


def is_config(target: str) -> bool:
    """Whether a submit target is a YAML config rather than a run folder."""
    return target.lower().endswith((".yaml", ".yml"))


def without_storage_options(args: list[str]) -> list[str]:
    """`args` without `--storage-option KEY=VALUE` (its values may be credentials: a job's argv is public)."""
    out: list[str] = []
    skip = False
    for a in args:
        if not skip and a != "--storage-option" and not a.startswith("--storage-option="):
            out.append(a)
        skip = a == "--storage-option" and not skip
    return out


def public_storage_options(args: list[str]) -> list[str]:
    """`args` with every `--storage-option` whose key names a credential left out (with a warning): a
    job's argv is shown by `ray job list`. Endpoint, region and the like stay; credentials come from
    the cluster's own identity."""
    out: list[str] = []
    dropped: list[str] = []
    it = iter(args)
    for a in it:
        if a == "--storage-option" or a.startswith("--storage-option="):
            value = a.split("=", 1)[1] if "=" in a and a.startswith("--storage-option=") else next(it, "")
            key = value.split("=", 1)[0]
            if storage.is_secret_name(key):
                dropped.append(key)
            else:
                out += ["--storage-option", value]
            continue
        out.append(a)
    if dropped:
        print(f"selfsup submit: not forwarding --storage-option {', '.join(dropped)} (credentials would be shown "
              "by `ray job list`); the job's nodes use their own identity (instance profile, Workload Identity)",
              file=sys.stderr)
    return out


def resolved_config(path: str, overrides: list[str], options: Optional[dict[str, Any]] = None) -> PretrainConfig:
    """The checked config (CONFIG may be a bundled name; `options` over its `storage`) with every local path
    absolute (the job runs in another folder)."""
    cfg = load_pretrain_config(path, overrides, options)
    absolute = storage.full_url
    data = dataclasses.replace(cfg.data, sources=[dataclasses.replace(s, url=absolute(s.url))
                                                  for s in cfg.data.sources])
    train = dataclasses.replace(cfg.train, init_from=cfg.train.init_from and absolute(cfg.train.init_from))
    retrain = dataclasses.replace(cfg.retrain, runs=cfg.retrain.runs and absolute(cfg.retrain.runs))
    check_env(cfg.cluster.env)
    return dataclasses.replace(cfg, run=absolute(cfg.run), data=data, train=train, retrain=retrain)


def run_cluster(run_url: str) -> ClusterConfig:
    """The cluster section of a run's config.yaml (defaults when the run has none yet)."""
    from selfsup.trainers import run_folder

    try:
        saved = run_folder.read_config(run_url)
    except (ValueError, OSError):
        return ClusterConfig()
    return saved.cluster if saved is not None else ClusterConfig()


def check_env(env: dict[str, str]) -> None:
    """Refuse credential-like names in cluster.env: runtime_env env_vars are visible to every cluster user."""
    bad = [k for k in env if storage.is_secret_name(k) or "_KEY" in k.upper() or k.upper() in CREDENTIAL_ENV]
    if bad:
        raise ValueError(f"cluster.env names credentials ({', '.join(sorted(bad))}): runtime_env env_vars are shown "
                         "by `ray job list`; give the cluster its own identity (instance profile, Workload "
                         "Identity, a mounted Secret) instead")


def metadata(kind: str, target: str, cluster: ClusterConfig, cfg: Optional[PretrainConfig] = None) -> dict[str, str]:
    """Job metadata (strings only): the command, its target, the image, who submitted it."""
    out = {"selfsup_command": kind, "target": storage.redact_url(target), "image": cluster.image,
           "submitted_by": f"{getpass.getuser()}@{socket.gethostname()}"}
    if cfg is not None:
        out["config_digest"] = config_digest(cfg)
    return out


def checkout_root() -> Optional[Path]:
    """The source checkout this selfsup runs from (an editable install), or None when it is an installed copy."""
    markers = [ROOT / "pyproject.toml", *(ROOT / folder / "__init__.py" for folder in PACKAGE_DIRS)]
    return ROOT if all(p.is_file() for p in markers) else None


def stage_working_dir(folder: Path, config: Optional[PretrainConfig], root: Optional[Path]) -> None:
    """Fill the job's working_dir: the resolved config without secrets (if any) and, from a checkout, its
    packages laid out as installed, so that `import selfsup.jobs` in the job and its workers finds them."""
    from selfsup.pipeline.config import to_yaml

    if config is not None:
        (folder / SHIPPED_CONFIG).write_text(to_yaml(config))  # secrets stripped
    if root is not None:
        skip = shutil.ignore_patterns("__pycache__", "*.pyc", ".mypy_cache", ".pytest_cache")
        for src, dest in sorted(PACKAGE_DIRS.items(), key=lambda item: item[1]):  # selfsup/ before its children
            shutil.copytree(root / src, folder / dest, ignore=skip, dirs_exist_ok=True)


def runtime_env(cluster: ClusterConfig, working_dir: Optional[Path]) -> dict[str, Any]:
    """The staged working_dir (none when there is nothing to ship) and only non-secret env vars."""
    check_env(cluster.env)
    env: dict[str, Any] = {"env_vars": {**SAFE_ENV, **{k: str(v) for k, v in cluster.env.items()}}}
    if working_dir is not None:
        env.update(working_dir=str(working_dir), excludes=[*EXCLUDES, *cluster.excludes])
    return env


def submit(client: Any, job: dict[str, Any], submission_id: Optional[str]) -> str:
    """Stage the working_dir (for this upload only) and submit; returns the job id."""
    job_id = submission_id or f"selfsup-{job['kind']}-{uuid.uuid4().hex[:8]}"
    argv = list(job["argv"])
    stage = Path(tempfile.mkdtemp(prefix="selfsup-submit-"))
    try:
        stage_working_dir(stage, job["config"], checkout_root())
        if job["config"] is not None:
            argv[1] = SHIPPED_CONFIG
        c = job["cluster"]
        entrypoint = " ".join([shlex.quote(c.python), "-m", "selfsup.jobs.cli", *map(shlex.quote, argv)])
        try:
            return client.submit_job(entrypoint=entrypoint, submission_id=job_id,
                                     runtime_env=runtime_env(c, stage if any(stage.iterdir()) else None),
                                     metadata=job["metadata"], entrypoint_num_cpus=c.entrypoint_cpus or None,
                                     entrypoint_num_gpus=c.entrypoint_gpus or None,
                                     entrypoint_resources=dict(c.entrypoint_resources) or None)
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - the Jobs API raises RuntimeError/requests errors
            raise ValueError(explain(e, client.get_address(), True)) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def warn_local_paths(job: dict[str, Any], address: str) -> None:
    """A remote cluster cannot see this machine's folders: say so when local paths go to one."""
    host = urlparse(address).hostname or ""
    if job["local"] and host not in ("127.0.0.1", "localhost", "::1", socket.gethostname()):
        print(f"selfsup submit: warning: {', '.join(job['local'])} are local paths; every node of the cluster at "
              f"{address} must see them at the same place (use s3:// or gs:// for a remote cluster)",
              file=sys.stderr)
