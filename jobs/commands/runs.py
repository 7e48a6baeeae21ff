"""`selfsup runs show RUN`: a run's state, checkpoints and latest accuracy table."""
from __future__ import annotations

import argparse
import json
from typing import Any

from selfsup.jobs.common import add_storage_args, storage_options
from selfsup.pipeline import storage
from selfsup.trainers import run_folder


def add_parser(sub: Any) -> None:
    """Register `selfsup runs`."""
    p = sub.add_parser("runs", help="inspect runs: status, checkpoints, evaluation results")
    rsub = p.add_subparsers(dest="runs_command", metavar="ACTION", required=True)
    show = rsub.add_parser("show", help="status, checkpoints and the latest accuracy table of RUN")
    show.add_argument("run_dir", metavar="RUN", help="run folder (path or URL)")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    add_storage_args(show)
    show.set_defaults(run=run_show)


def run_show(args: argparse.Namespace) -> int:
    """Print the run's status line, checkpoints and table."""
    from selfsup.jobs.evaluation.report import format_table, latest_table, run_saw_labels
    from selfsup.trainers import checkpoint as ck

    opts = storage_options(args)
    status = run_folder.read_status(args.run_dir, opts)
    if status is None:
        raise FileNotFoundError(f"{storage.redact_url(args.run_dir)} is not a run folder "
                                f"(no {run_folder.STATUS})")
    ckpts = ck.list_checkpoints(args.run_dir, opts)
    table, saw = latest_table(args.run_dir, opts), run_saw_labels(args.run_dir, opts)
    if args.json:
        print(json.dumps({"status": status.to_dict(), "checkpoints": [u for _, u in ckpts], "results": table,
                          "saw_labels": saw}))
        return 0
    loss = f", loss {status.loss:.4f}" if isinstance(status.loss, (int, float)) else ""
    print(f"run {storage.redact_url(args.run_dir)}: {status.state} at step {status.step}/{status.steps}{loss}")
    marks = [f"{u.rsplit('/', 1)[-1]}{'*' if ck.is_evaluated(u, opts) else ''}" for _, u in ckpts]
    print(f"checkpoints ({len(ckpts)}, * = evaluated): {' '.join(marks) or '(none)'}")
    print(format_table(table, saw) if table else "no evaluation results yet (selfsup evaluate RUN)")
    return 0
