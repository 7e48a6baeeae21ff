"""`selfsup pretrain CONFIG [key=value ...]`: DDP pretraining on the current Ray cluster.

The command parses its flags and calls the training engine (jobs/training.py), which freezes
the data snapshot into the run folder, writes the resolved config, starts a TorchTrainer (or,
with --no-ray, the same loop in this process) and prints a live progress line from the run's
status.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from selfsup.jobs.common import add_storage_args, config_help, load_pretrain_config, storage_options
from selfsup.jobs.training import TrainOptions, train
from selfsup.pipeline import storage
from selfsup.trainers import scaling


def add_parser(sub: Any) -> None:
    """Register `selfsup pretrain`."""
    p = sub.add_parser("pretrain", help="pretrain an encoder with a self-supervised objective",
                       description="Pretrain on the current Ray cluster (RAY_ADDRESS or --address; a local "
                                   "one otherwise). CONFIG is a YAML file or the name of a bundled config "
                                   "(simclr_image, mae_audio, …; see jobs/configs/); key=value "
                                   "overrides win, e.g. train.steps=200 scaling.num_workers=2 run=s3://b/runs/x.",
                       epilog="Checkpoints land in RUN/checkpoints/step-N/ (state.pt, encoder.pt, meta.json); "
                              "the last train.keep (3) and the promoted one are kept, older ones deleted; with "
                              "train.keep_unevaluated=true (for `selfsup evaluate --watch` beside the run) also every "
                              "one not yet evaluated, which without an evaluator is every one. Metrics in "
                              "RUN/metrics.jsonl; state in RUN/status.json.")
    p.add_argument("config", metavar="CONFIG", help=config_help())
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=3e-4")
    p.add_argument("--resume", action="store_true",
                   help="continue the run folder from its latest complete checkpoint at its exact data position")
    p.add_argument("--allow-plan-change", action="store_true",
                   help="with --resume: accept changed data settings (batch size, seed, mix, run length, "
                        "sources; otherwise refused, as the data position would skip or repeat samples) and "
                        "go on with them from the start of the next epoch")
    p.add_argument("--address", help="Ray cluster address, or `auto` for the cluster `ray start` runs on this machine (default: $RAY_ADDRESS, else start a local one)")
    p.add_argument("--no-ray", action="store_true",
                   help="run the same loop in this process without Ray (one worker; local-process streams)")
    p.add_argument("--stop-after", type=int, metavar="STEP",
                   help="stop at this step with a checkpoint (the schedule still spans train.steps); "
                        "continue later with --resume, e.g. in preemptible time slots")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    add_storage_args(p)
    p.add_argument("--show-hyper", action="store_true",
                   help="print the hyper-parameters this run would train with (global batch, lr, warmup, steps: "
                        "a recipe's per-GPU values scaled to scaling.num_workers) and exit")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Load and check the config, then train; a failure other than a bad input exits 1."""
    cfg = load_pretrain_config(args.config, args.overrides, storage_options(args))
    if args.show_hyper:
        workers = 1 if args.no_ray else cfg.scaling.num_workers
        print(scaling.describe(scaling.hyper_parameters(cfg, workers)))
        return 0
    options = TrainOptions(resume=args.resume, use_ray=not args.no_ray, address=args.address,
                           stop_after=args.stop_after, quiet=args.quiet,
                           allow_plan_change=args.allow_plan_change)
    try:
        train(cfg, options)
    except (KeyboardInterrupt, ValueError, FileNotFoundError, PermissionError):
        raise  # bad input or a refused folder: the command line reports it (exit 2)
    except BaseException as e:
        print(f"selfsup pretrain: failed: {storage.redact(str(e))[:2000]}", file=sys.stderr)
        return 1
    return 0
