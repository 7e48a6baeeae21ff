"""`selfsup retrain CONFIG [--as-of TIME] [--min-new-samples N]`: parse the flags, then run
the retrain engine (selfsup.jobs.cluster.retrain) under its lease.
"""
from __future__ import annotations

import argparse
from typing import Any

from selfsup.jobs.cluster.retrain import RetrainOptions, check, parse_as_of, retrain
from selfsup.jobs.common import add_storage_args, config_help, load_pretrain_config, storage_options


def add_parser(sub: Any) -> None:
    """Register `selfsup retrain`."""
    p = sub.add_parser("retrain", help="scheduled retraining: train on new shards, evaluate, promote or reject",
                       description="Idempotent retraining for a schedule (cron): when enough new samples arrived "
                                   "since the last attempted run, pretrain a new run warm-started from the promoted "
                                   "checkpoint, evaluate it and promote it if it is not worse. The `retrain` section "
                                   "of CONFIG holds runs, eval_set, metric, target, tolerance, min_new_samples, "
                                   "lease_seconds and steps.",
                       epilog="Decisions: RUNS/retrain-log.jsonl; the promoted model: RUNS/promoted.json.")
    p.add_argument("config", metavar="CONFIG", help=config_help())
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. retrain.tolerance=0.01")
    p.add_argument("--as-of", metavar="TIME", help="use the manifest as it was at TIME (ISO 8601, UTC unless "
                                                   "it names a zone; default now)")
    p.add_argument("--min-new-samples", type=int, metavar="N",
                   help="train only when at least N new samples arrived (default retrain.min_new_samples)")
    p.add_argument("--address", help="Ray cluster address, or `auto` for the cluster `ray start` runs on this machine (default: $RAY_ADDRESS, else start a local one)")
    p.add_argument("--no-ray", action="store_true", help="train and evaluate in this process, without Ray")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    add_storage_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Parse the flags and retrain."""
    cfg = check(load_pretrain_config(args.config, args.overrides, storage_options(args)))
    options = RetrainOptions(as_of=parse_as_of(args.as_of), min_new_samples=args.min_new_samples,
                             use_ray=not args.no_ray, address=args.address, quiet=args.quiet)
    return retrain(cfg, options)
