"""`selfsup demo`: the main job on the embedded default — real data → shards → pretraining → evaluation.

Local Ray, a local folder as storage. Rerunning completes what is missing: finished shards
are kept, a finished run is not retrained, evaluated checkpoints are not evaluated again.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from selfsup.jobs.common import CONFIGS
from selfsup.jobs.data import find_dataset, missing_line
from selfsup.jobs.demo_plans import EXTRA_SETS, PLANS, QUALITY, QUICK, write_extra_sets, write_plan_data

__all__ = ["CONFIGS", "PLANS", "QUALITY", "QUICK", "add_parser", "run"]


def add_parser(sub: Any) -> None:
    """Register `selfsup demo`."""
    p = sub.add_parser("demo", help="run the whole chain on bundled real data (local Ray, local folder)",
                       description="Shards → pretraining (2 Ray Train workers, a small CPU backbone) → "
                                   "evaluation (kNN and linear probe vs. random init and raw inputs), on "
                                   "Fashion-MNIST (image), spoken digits (audio) or moving Fashion-MNIST items "
                                   "(video). Rerunning reuses what is already done.")
    p.add_argument("--modality", choices=sorted(PLANS), default="image", help="which demo (default image)")
    p.add_argument("--data", help="folder holding the datasets (default: $SELFSUP_DATA, "
                                  "/usr/share/datasets, ../shared/datasets)")
    p.add_argument("--out", default="runs/demo", help="local folder (or URL) for shards and runs (default runs/demo)")
    p.add_argument("--quality", action="store_true",
                   help="the tuned recipe (jobs/configs/quality/) with the full probe sets; see docs/quality.md")
    p.add_argument("--quick", action="store_true",
                   help="the CI learning bars: the quality recipes on smaller probe sets within --budget-minutes "
                        "(default 5), only the final checkpoint evaluated; see docs/quality.md")
    p.add_argument("--budget-minutes", type=float,
                   help="wall-time budget for the whole demo: pretraining stops (checkpointed) in time to "
                        "leave room for evaluation (default: none; 20 with --quality, 5 with --quick)")
    p.add_argument("--write-sets", nargs="+", choices=EXTRA_SETS, metavar="SET",
                   help="only write these audio data sets under OUT/data/ and stop: instruments (the "
                        "instrument-family probe set), general-audio (the unlabeled pretraining corpus); see docs/data.md")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=100")
    p.set_defaults(run=run)


def cli(*argv: str) -> None:
    """Run a `selfsup` subcommand in this process; stop on failure."""
    from selfsup.jobs.cli import main

    code = main(list(argv))
    if code:
        raise SystemExit(code)


def run(args: argparse.Namespace) -> int:
    """Shards, pretraining, evaluation; ends with the accuracy table and plot paths."""
    from selfsup.pipeline import storage
    from selfsup.trainers import checkpoint as ck

    if args.quick and args.quality:
        raise ValueError("--quick and --quality exclude each other")
    if args.write_sets:
        for url in write_extra_sets(args.write_sets, args.data, args.out):
            print(f"written: {storage.redact_url(url)}")
        return 0
    plan = (QUICK if args.quick else QUALITY if args.quality else PLANS)[args.modality]
    budget = args.budget_minutes or (20.0 if args.quality else 5.0 if args.quick else None)
    source = find_dataset(plan.dataset, args.data)
    if source is None:
        print(missing_line(plan.dataset, args.data), file=sys.stderr)
        return 1
    t0 = time.time()
    written = write_plan_data(plan, source, f"{args.out}/data", data=args.data)
    eval_sets = [f"{name}={url}" for name, url in written.eval_sets]
    run_dir = f"{args.out}/{plan.config.replace('/', '_')}" + ("_quick" if args.quick else "")
    # the evaluation below runs after pretraining: keep every checkpoint until it has been evaluated
    overrides = [f"run={run_dir}", written.sources_override(), "train.keep_unevaluated=true",
                 *plan.overrides]
    if budget:
        left = budget - (time.time() - t0) / 60 - plan.eval_minutes
        if left <= 1:
            raise ValueError(f"--budget-minutes {budget} leaves {left:.1f} min for pretraining after writing "
                             f"shards and reserving {plan.eval_minutes} min for evaluation; give more")
        overrides.append(f"train.time_limit_minutes={left:.2f}")
    overrides += args.overrides
    print(f"== pretrain: {plan.config} → {run_dir}", file=sys.stderr)
    resume = ["--resume"] if ck.latest_checkpoint(run_dir) else []
    cli("pretrain", str(CONFIGS / f"{plan.config}.yaml"), *overrides, *resume)
    for target in plan.targets:
        print(f"== evaluate: {run_dir} ({target})", file=sys.stderr)
        cli("evaluate", run_dir, "--watch", "--poll", "1", "--target", target,
            *[a for item in eval_sets for a in ("--eval-set", item)], "--quiet")
    for line in written.missing:
        print(f"not evaluated: {line}", file=sys.stderr)
    print(f"\nselfsup demo ({args.modality}) done in {time.time() - t0:.0f} s; run folder {storage.redact_url(run_dir)}; "
          f"see `selfsup runs show {run_dir}`")
    return 0
