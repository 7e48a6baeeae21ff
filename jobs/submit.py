"""`selfsup submit pretrain|evaluate|retrain CONFIG_OR_RUN [ARGS...] --address http://HEAD:8265`.

The job runs `python -m selfsup.jobs.cli KIND ...` on the cluster through the Ray Jobs API. Its
working_dir is this source tree without .venv, data, runs, caches and .git; dependencies come from
the cluster's image (`cluster.image`, recorded in the job metadata), never from a per-job pip
install. The config is resolved here (file + overrides, checked, local paths made absolute), shipped
inside the working_dir without secrets, and the job reads it from there. Credentials are never put
in runtime_env env_vars, which `ray job list` shows to anyone: the cluster's own identity supplies them.
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
import uuid
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from selfsup.jobs.jobclient import add_client_args, connect, exit_code, explain, follow, resolve_address
from selfsup.pipeline import storage

ROOT = Path(__file__).resolve().parents[1]
STAGING = ".selfsup-submit"
KINDS = {"pretrain": "selfsup.jobs.pretrain", "evaluate": "selfsup.jobs.evaluate", "retrain": "selfsup.jobs.retrain"}
EXCLUDES = ["/.venv", "/venv", "/.git", "/data", "/runs", "/build", "/dist", ".cache", "__pycache__", "*.pyc",
            ".pytest_cache", ".mypy_cache", ".ruff_cache", "*.egg-info", ".ipynb_checkpoints"]
SAFE_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS",
                  "RAY_AUTH_TOKEN", "HF_TOKEN", "WANDB_API_KEY")


def add_parser(sub: Any) -> None:
    """Register `selfsup submit`."""
    p = sub.add_parser("submit", help="run pretrain, evaluate or retrain as a job on a Ray cluster",
                       description="Submit a selfsup command to a Ray cluster through the Jobs API. The job runs "
                                   "this source tree on the cluster's image; prints the job id.",
                       epilog="Token auth (Ray 2.60): the token is read from --auth-token-file, $RAY_AUTH_TOKEN, "
                              "$RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token and sent in the Authorization header.")
    ksub = p.add_subparsers(dest="submit_command", metavar="JOB", required=True)
    for kind, what in (("pretrain", "CONFIG"), ("evaluate", "RUN_OR_CONFIG"), ("retrain", "CONFIG")):
        k = ksub.add_parser(kind, help=f"submit `selfsup {kind} {what} ...`",
                            description=f"Submit `selfsup {kind} {what} ARGS...` to the cluster. ARGS are "
                                        f"those of `selfsup {kind}` (see its --help) and the options below, "
                                        "in any order.")
        k.add_argument("target", metavar=what, help="a YAML config (path or URL)" if what == "CONFIG"
                       else "a run folder (path or URL), or a YAML config naming the run")
        k.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                       help=f"`selfsup {kind}` arguments (key=value overrides, options)")
        add_submit_args(k, kind)
        k.set_defaults(run=run, submit_kind=kind)


def add_submit_args(p: argparse.ArgumentParser, kind: str) -> None:
    """Options of `submit` itself (also accepted among the forwarded ARGS)."""
    add_client_args(p)
    p.add_argument("--follow", action="store_true",
                   help="stream the job's log until it ends; exit 0 if it succeeded, 1 otherwise")
    p.add_argument("--submission-id", help="job id to use (default selfsup-KIND-RANDOM)")
    if kind == "pretrain":
        p.add_argument("--with-eval", action="append", default=[], metavar="NAME=TRAIN_URL[,TEST_URL]",
                       help="also submit `selfsup evaluate RUN --watch --eval-set ...` as its own job beside "
                            "the training job")


def run(args: argparse.Namespace) -> int:
    """Resolve what to run, submit it, print the job id (and follow it)."""
    kind = args.submit_kind
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_submit_args(own, kind)
    extra, forwarded = own.parse_known_args(args.args)
    for name, value in vars(extra).items():
        if value not in (None, False, []):
            setattr(args, name, value)
    job = plan_job(kind, args.target, forwarded)
    client = connect(args.address, args.auth_token_file)
    warn_local_paths(job, resolve_address(args.address))
    job_id = submit(client, job, args.submission_id)
    print(job_id)
    ids = [job_id]
    for item in getattr(args, "with_eval", []) or []:
        watcher = plan_job("evaluate", job["run"], watch_args(item), job["cluster"])
        watcher["metadata"]["beside"] = job_id
        ids.append(submit(client, watcher, None))
        print(ids[-1])
    address = resolve_address(args.address)
    print(f"selfsup submit: {kind} job {job_id} submitted to {address}"
          + (f" (evaluation {', '.join(ids[1:])} beside it)" if len(ids) > 1 else "")
          + f"; logs: selfsup jobs logs {job_id} --address {address}", file=sys.stderr)
    if not args.follow:
        return 0
    return exit_code(follow(client, job_id))


def watch_args(eval_set: str) -> list[str]:
    """`selfsup evaluate RUN ...` arguments of the watcher that --with-eval submits beside a training job."""
    return ["--watch", "--poll", "2", "--eval-set", eval_set, "--quiet"]


def plan_job(kind: str, target: str, forwarded: list[str], cluster: Any = None) -> dict[str, Any]:
    """What to run: argv for `selfsup.jobs.cli`, the resolved config to ship (if any), cluster settings, metadata."""
    from selfsup.trainers.config import ClusterConfig

    ns = parse_forwarded(kind, target, forwarded)
    if kind == "evaluate":
        cfg = resolved_config(target, []) if is_config(target) else None
        run_url = cfg.run if cfg else storage.full_url(target)
        cluster = cluster or (cfg.cluster if cfg else run_cluster(run_url))
        return {"kind": kind, "argv": ["evaluate", run_url, *absolute_eval_sets(forwarded)], "config": None,
                "cluster": cluster, "run": run_url, "local": [run_url] if storage.is_local(run_url) else [],
                "metadata": metadata(kind, run_url, cluster or ClusterConfig())}
    cfg = resolved_config(ns.config, ns.overrides)
    rest = list(forwarded)
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


def resolved_config(path: str, overrides: list[str]) -> Any:
    """The checked config with every local path absolute (the job runs in another folder)."""
    from selfsup.pipeline.config import load_config
    from selfsup.trainers.config import PretrainConfig, validate

    cfg = validate(load_config(PretrainConfig, path, overrides))
    absolute = storage.full_url
    data = dataclasses.replace(cfg.data, sources=[dataclasses.replace(s, url=absolute(s.url))
                                                  for s in cfg.data.sources])
    train = dataclasses.replace(cfg.train, init_from=cfg.train.init_from and absolute(cfg.train.init_from))
    retrain = dataclasses.replace(cfg.retrain, runs=cfg.retrain.runs and absolute(cfg.retrain.runs))
    check_env(cfg.cluster.env)
    return dataclasses.replace(cfg, run=absolute(cfg.run), data=data, train=train, retrain=retrain)


def run_cluster(run_url: str) -> Any:
    """The cluster section of a run's config.yaml (defaults when the run has none yet)."""
    from selfsup.pipeline.config import load_config
    from selfsup.trainers.config import ClusterConfig, PretrainConfig

    url = storage.join(run_url, "config.yaml")
    try:
        return load_config(PretrainConfig, url).cluster if storage.exists(url) else ClusterConfig()
    except (ValueError, OSError):
        return ClusterConfig()


def check_env(env: dict[str, str]) -> None:
    """Refuse credential-like names in cluster.env: runtime_env env_vars are visible to every cluster user."""
    bad = [k for k in env if storage.is_secret_name(k) or "_KEY" in k.upper() or k.upper() in CREDENTIAL_ENV]
    if bad:
        raise ValueError(f"cluster.env names credentials ({', '.join(sorted(bad))}): runtime_env env_vars are shown "
                         "by `ray job list`; give the cluster its own identity (instance profile, Workload "
                         "Identity, a mounted Secret) instead")


def metadata(kind: str, target: str, cluster: Any, cfg: Any = None) -> dict[str, str]:
    """Job metadata (strings only): the command, its target, the image, who submitted it."""
    from selfsup.trainers.config import config_digest

    out = {"selfsup_command": kind, "target": storage.redact_url(target), "image": cluster.image,
           "submitted_by": f"{getpass.getuser()}@{socket.gethostname()}"}
    if cfg is not None:
        out["config_digest"] = config_digest(cfg)
    return out


def runtime_env(cluster: Any) -> dict[str, Any]:
    """working_dir = this source tree minus heavy and private folders; only non-secret env vars."""
    check_env(cluster.env)
    if not (ROOT / "pyproject.toml").is_file() or not (ROOT / "jobs" / "cli.py").is_file():
        raise ValueError(f"selfsup submit ships the source tree as the job's working_dir, but {ROOT} is not a "
                         "selfsup checkout; run it from one (pip install -e .)")
    return {"working_dir": str(ROOT), "excludes": [*EXCLUDES, *cluster.excludes],
            "env_vars": {**SAFE_ENV, **{k: str(v) for k, v in cluster.env.items()}}}


def submit(client: Any, job: dict[str, Any], submission_id: Optional[str]) -> str:
    """Ship the config into the working_dir (for this upload only) and submit; returns the job id."""
    from selfsup.pipeline.config import to_yaml

    job_id = submission_id or f"selfsup-{job['kind']}-{uuid.uuid4().hex[:8]}"
    stage = ROOT / STAGING / job_id
    argv = list(job["argv"])
    try:
        if job["config"] is not None:
            stage.mkdir(parents=True, exist_ok=True)
            (stage / "config.yaml").write_text(to_yaml(job["config"]))  # secrets stripped
            argv[1] = f"{STAGING}/{job_id}/config.yaml"
        c = job["cluster"]
        entrypoint = " ".join([shlex.quote(c.python), "-m", "selfsup.jobs.cli", *map(shlex.quote, argv)])
        try:
            return client.submit_job(entrypoint=entrypoint, submission_id=job_id, runtime_env=runtime_env(c),
                                     metadata=job["metadata"], entrypoint_num_cpus=c.entrypoint_cpus or None,
                                     entrypoint_num_gpus=c.entrypoint_gpus or None,
                                     entrypoint_resources=dict(c.entrypoint_resources) or None)
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - the Jobs API raises RuntimeError/requests errors
            raise ValueError(explain(e, client.get_address(), True)) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if (ROOT / STAGING).is_dir() and not any((ROOT / STAGING).iterdir()):
            shutil.rmtree(ROOT / STAGING, ignore_errors=True)


def warn_local_paths(job: dict[str, Any], address: str) -> None:
    """A remote cluster cannot see this machine's folders: say so when local paths go to one."""
    host = urlparse(address).hostname or ""
    if job["local"] and host not in ("127.0.0.1", "localhost", "::1", socket.gethostname()):
        print(f"selfsup submit: warning: {', '.join(job['local'])} are local paths; every node of the cluster at "
              f"{address} must see them at the same place (use s3:// or gs:// for a remote cluster)",
              file=sys.stderr)
