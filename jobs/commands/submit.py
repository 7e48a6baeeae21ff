"""`selfsup submit pretrain|evaluate|retrain CONFIG_OR_RUN [ARGS...]`: parse the flags, plan and submit the job
through the engine (selfsup.jobs.cluster.submit), print its id, and follow it with --follow.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from selfsup.jobs.cluster.jobclient import add_client_args, connect, exit_code, follow, resolve_address
from selfsup.jobs.cluster.submit import checkout_root, plan_job, submit, warn_local_paths, watch_args


def add_parser(sub: Any) -> None:
    """Register `selfsup submit`."""
    p = sub.add_parser("submit", help="run pretrain, evaluate or retrain as a job on a Ray cluster",
                       description="Submit a selfsup command to a Ray cluster through the Jobs API. The job runs "
                                   "on the cluster's image: with this checkout's code when run from a checkout, "
                                   "with the image's selfsup when selfsup is installed; prints the job id.",
                       epilog="Token auth (Ray 2.60): the token is read from --auth-token-file, $RAY_AUTH_TOKEN, "
                              "$RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token and sent in the Authorization header.")
    ksub = p.add_subparsers(dest="submit_command", metavar="JOB", required=True)
    for kind, what in (("pretrain", "CONFIG"), ("evaluate", "RUN_OR_CONFIG"), ("retrain", "CONFIG")):
        k = ksub.add_parser(kind, help=f"submit `selfsup {kind} {what} ...`",
                            description=f"Submit `selfsup {kind} {what} ARGS...` to the cluster. ARGS are "
                                        f"those of `selfsup {kind}` (see its --help) and the options below, "
                                        "in any order.")
        k.add_argument("target", metavar=what,
                       help="a YAML config (path or URL) or a bundled config's name (`selfsup pretrain --help`)"
                       if what == "CONFIG" else "a run folder (path or URL), or a YAML config naming the run")
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
                            "the training job (which then keeps every checkpoint until it is evaluated: "
                            "train.keep_unevaluated=true)")


def run(args: argparse.Namespace) -> int:
    """Resolve what to run, submit it, print the job id (and follow it)."""
    kind = args.submit_kind
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_submit_args(own, kind)
    extra, forwarded = own.parse_known_args(args.args)
    for name, value in vars(extra).items():
        if value not in (None, False, []):
            setattr(args, name, value)
    if getattr(args, "with_eval", None):  # an evaluator beside the run: keep checkpoints until it marks them
        forwarded = [*forwarded, "train.keep_unevaluated=true"]
    job = plan_job(kind, args.target, forwarded)
    client = connect(args.address, args.auth_token_file)
    warn_local_paths(job, resolve_address(args.address))
    if checkout_root() is None:
        print(f"selfsup submit: selfsup is installed here, not run from a checkout: the job ships only its resolved "
              f"config, and the selfsup of the cluster's image ({job['cluster'].image}) runs it", file=sys.stderr)
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
