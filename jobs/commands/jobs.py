"""`selfsup jobs ls|logs|stop`: the jobs of a Ray cluster, through the Jobs API (token auth as `submit`)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from selfsup.jobs.cluster.jobclient import TERMINAL, add_client_args, connect, exit_code, explain, follow, status_name


def add_parser(sub: Any) -> None:
    """Register `selfsup jobs`."""
    p = sub.add_parser("jobs", help="list, read and stop jobs on a Ray cluster",
                       description="The jobs of the Ray cluster at --address (the dashboard, http://HEAD:8265).")
    jsub = p.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    ls = jsub.add_parser("ls", help="every job: id, status, selfsup command, target, start time, duration")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    add_client_args(ls)
    ls.set_defaults(run=run_ls)
    logs = jsub.add_parser("logs", help="a job's log: its driver's output, with its Ray workers' lines "
                                       "(Ray Train workers, ShardStreams) for jobs that selfsup submitted")
    logs.add_argument("job_id", metavar="JOB_ID")
    logs.add_argument("--follow", action="store_true", help="keep printing until the job ends; exit 0 if it "
                                                            "succeeded, 1 otherwise")
    add_client_args(logs)
    logs.set_defaults(run=run_logs)
    stop = jsub.add_parser("stop", help="stop a job")
    stop.add_argument("job_id", metavar="JOB_ID")
    stop.add_argument("--no-wait", action="store_true", help="return at once instead of waiting for it to end")
    add_client_args(stop)
    stop.set_defaults(run=run_stop)


def run_ls(args: argparse.Namespace) -> int:
    """Print one line per job, oldest first."""
    client = connect(args.address, args.auth_token_file)
    rows = [job_row(j) for j in call(client, "list_jobs")]
    rows.sort(key=lambda r: r["start_time"] or 0)
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print("no jobs")
        return 0
    print(f"{'JOB_ID':<32} {'STATUS':<10} {'COMMAND':<9} {'STARTED':<19} {'TOOK':>7}  TARGET")
    for r in rows:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["start_time"] / 1000)) if r["start_time"] else "-"
        end = r["end_time"] or (time.time() * 1000 if r["start_time"] else None)
        took = f"{(end - r['start_time']) / 1000:.0f}s" if r["start_time"] and end else "-"
        print(f"{r['job_id']:<32} {r['status']:<10} {r['command']:<9} {started:<19} {took:>7}  {r['target']}")
    return 0


def job_row(job: Any) -> dict[str, Any]:
    """The fields `jobs ls` shows, from a JobDetails."""
    meta = dict(job.metadata or {})
    return {"job_id": job.submission_id or job.job_id or "?", "status": status_name(job.status),
            "command": meta.get("selfsup_command", "-"), "target": meta.get("target", job.entrypoint or ""),
            "image": meta.get("image", ""), "start_time": job.start_time, "end_time": job.end_time,
            "message": job.message or ""}


def run_logs(args: argparse.Namespace) -> int:
    """Print the log (and follow it)."""
    client = connect(args.address, args.auth_token_file)
    if args.follow:
        return exit_code(follow(client, args.job_id))
    sys.stdout.write(call(client, "get_job_logs", args.job_id))
    return 0


def run_stop(args: argparse.Namespace) -> int:
    """Ask the job to stop; wait until it has ended unless --no-wait."""
    client = connect(args.address, args.auth_token_file)
    stopped = call(client, "stop_job", args.job_id)
    if not stopped:
        status = status_name(call(client, "get_job_status", args.job_id))
        print(f"job {args.job_id} had already ended: {status}")
        return 0
    while not args.no_wait:
        status = status_name(call(client, "get_job_status", args.job_id))
        if status in TERMINAL:
            print(f"job {args.job_id}: {status}")
            return 0
        time.sleep(0.5)
    print(f"job {args.job_id}: stop requested")
    return 0


def call(client: Any, method: str, *args: Any) -> Any:
    """A Jobs API call whose failures (unknown job id, server errors) become one-line errors."""
    try:
        return getattr(client, method)(*args)
    except RuntimeError as e:
        text = " ".join(str(e).split())
        if "does not exist" in text or "404" in text:
            raise ValueError(f"no job {args[0] if args else ''} on {client.get_address()} "
                             "(see `selfsup jobs ls`)") from None
        raise ValueError(explain(e, client.get_address(), True)) from None
