"""`selfsup evaluate RUN_OR_CHECKPOINT`: parse the flags, then run the evaluation engine
(selfsup.jobs.evaluation.job: kNN and linear probes on frozen features, results store, plots).
"""
from __future__ import annotations

import argparse
from typing import Any

from selfsup.jobs.common import add_storage_args, ensure_ray, storage_options
from selfsup.jobs.evaluation.job import METHODS, EvalJob, EvalOptions, parse_eval_sets, run_of
from selfsup.pipeline import storage


def add_parser(sub: Any) -> None:
    """Register `selfsup evaluate`."""
    p = sub.add_parser("evaluate", help="kNN / linear-probe accuracy of checkpoints on labeled shards",
                       description="Evaluate RUN's latest checkpoint (or a given checkpoints/step-N) with frozen "
                                   "features: kNN (k=20, cosine, T=0.07) and a linear probe, beside a random-init "
                                   "encoder and the raw inputs. Results: RUN/eval/results.parquet and plots.")
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT", help="a run folder or one of its checkpoints (path or URL)")
    p.add_argument("--eval-set", action="append", default=[], metavar="NAME=TRAIN_URL[,TEST_URL]",
                   help="labeled shards: the probe-train split of TRAIN_URL and the probe-test split of TEST_URL "
                        "(default TEST_URL = TRAIN_URL); default: every training source holding both splits")
    p.add_argument("--methods", default="knn,linear", help="comma list of knn, linear (default both)")
    p.add_argument("--target", default="cls", help="label to predict: cls, or a key of the samples' .json "
                                                   "(e.g. motion) (default cls)")
    p.add_argument("--watch", action="store_true",
                   help="evaluate each new checkpoint once until the run's status.json says finished, stopped "
                        "or failed (train the run with train.keep_unevaluated=true, or retention may delete a "
                        "checkpoint before it is evaluated)")
    p.add_argument("--poll", type=float, default=10.0, help="seconds between checks with --watch (default 10)")
    p.add_argument("--no-baselines", action="store_true", help="skip the random-init and raw baselines")
    p.add_argument("--workers", type=int, default=2, help="feature-extraction actors (default 2)")
    p.add_argument("--worker-cpus", type=float, default=1.0, help="CPUs per extraction actor (default 1)")
    p.add_argument("--gpus", type=float, default=0.0, help="GPUs per extraction actor (default 0)")
    p.add_argument("--batch-size", type=int, default=256, help="eval batch size (default 256)")
    p.add_argument("--address", help="Ray cluster address, or `auto` for the cluster `ray start` runs on this machine (default: $RAY_ADDRESS, else start a local one)")
    p.add_argument("--no-ray", action="store_true", help="extract features in this process")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_storage_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate one checkpoint, or watch a run."""
    from selfsup.trainers import checkpoint as ck

    opts = storage_options(args)
    args.path = storage.full_url(args.path)  # actors run in other folders
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"--methods {args.methods!r}: valid methods are {', '.join(METHODS)}")
    if storage.exists(storage.join(args.path, ck.META), opts):
        run_dir, ckpts = run_of(args.path), [args.path.rstrip("/")]
    else:
        run_dir, ckpts = args.path.rstrip("/"), []
        if not args.watch:
            ckpts = [ck.resolve_checkpoint(run_dir, opts)]
    options = EvalOptions(workers=args.workers, worker_cpus=args.worker_cpus, gpus=args.gpus,
                          batch_size=args.batch_size, no_baselines=args.no_baselines, quiet=args.quiet,
                          use_ray=not args.no_ray)
    job = EvalJob(run_dir, parse_eval_sets(args.eval_set, run_dir, opts), methods, args.target, opts, options)
    if not args.no_ray:
        ensure_ray(args.address)
    if args.watch:
        return job.watch(args.poll)
    for c in ckpts:
        job.evaluate(c)
    job.finish()
    return 0
