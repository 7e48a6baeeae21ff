"""`selfsup demo`: the main job on the embedded default — real data → shards → pretraining → evaluation.

Local Ray, a local folder as storage. Rerunning completes what is missing: finished shards
are kept, a finished run is not retrained, evaluated checkpoints are not evaluated again.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from selfsup.jobs.common import CONFIGS
from selfsup.jobs.data import GENERAL_AUDIO, SOUNDFONT_FILE, find_dataset, general_audio_parts, missing_line


@dataclass(frozen=True)
class DemoPlan:
    """What one modality's demo writes, trains and evaluates."""

    dataset: str                     # selfsup.jobs.data name
    folder: str                      # under OUT/data/
    modality: str
    config: str                      # jobs/configs/<config>.yaml
    splits: list[tuple[str, list[str]]]  # (split, extra `shards write` args)
    targets: list[str] = field(default_factory=lambda: ["cls"])
    overrides: list[str] = field(default_factory=list)
    eval_minutes: float = 3.0        # reserved for evaluation inside --budget-minutes
    more_sets: list[tuple[str, list[tuple[str, list[str]]]]] = field(default_factory=list)  # eval-only folders


def moving_splits(pretrain: int, probe_train: int) -> list[tuple[str, list[str]]]:
    """`shards write` splits of moving Fashion-MNIST: `pretrain` and `probe_train` clips of the train subset
    (probe-train drawn with another seed), 1000 clips of the test subset as probe-test."""
    moving = ["--source-type", "moving-fashion-mnist", "--samples-per-shard", "500"]
    return [("pretrain", [*moving, "--subset", "train", "--limit", str(pretrain)]),
            ("probe-train", [*moving, "--subset", "train", "--limit", str(probe_train), "--seed", "1"]),
            ("probe-test", [*moving, "--subset", "test", "--limit", "1000"])]


# FSDD's customary split, reported beside the held-out speaker: recordings 0-4 of every speaker are probe-test
FSDD_CUSTOMARY = ("fsdd-customary", [
    ("probe-train", ["--exclude", r"_[0-4]\.wav$", "--samples-per-shard", "1000"]),
    ("probe-test", ["--include", r"_[0-4]\.wav$", "--samples-per-shard", "500"])])

PLANS = {
    "image": DemoPlan("fashion-mnist", "fashion-mnist", "image", "simclr_image", [
        ("pretrain", ["--subset", "train", "--samples-per-shard", "10000"]),
        ("probe-train", ["--subset", "train", "--limit", "10000", "--samples-per-shard", "5000"]),
        ("probe-test", ["--subset", "test", "--samples-per-shard", "5000"])]),
    "audio": DemoPlan("fsdd", "fsdd", "audio", "simclr_audio", [
        ("pretrain", ["--exclude", "_theo_", "--samples-per-shard", "500"]),
        ("probe-train", ["--exclude", "_theo_", "--samples-per-shard", "500"]),
        ("probe-test", ["--include", "_theo_", "--samples-per-shard", "500"])], more_sets=[FSDD_CUSTOMARY]),
    "video": DemoPlan("fashion-mnist", "moving-fashion-mnist", "video", "simclr_video", moving_splits(4000, 2000),
                      targets=["cls", "motion"]),
}


# --quality: the tuned recipes of jobs/configs/quality/ and the full probe sets (docs/quality.md)
QUALITY = {
    "image": DemoPlan("fashion-mnist", "fashion-mnist-full", "image", "quality/image", [
        ("pretrain", ["--subset", "train", "--samples-per-shard", "10000"]),
        ("probe-train", ["--subset", "train", "--samples-per-shard", "10000"]),
        ("probe-test", ["--subset", "test", "--samples-per-shard", "10000"])], eval_minutes=7.0),
    "audio": DemoPlan("fsdd", "fsdd", "audio", "quality/audio", PLANS["audio"].splits, eval_minutes=3.5,
                      more_sets=PLANS["audio"].more_sets),
    "video": DemoPlan("fashion-mnist", "moving-fashion-mnist", "video", "quality/video", PLANS["video"].splits,
                      targets=["motion", "cls"], eval_minutes=4.0),
}


# --quick: the CI learning bars (tests/quality/test_quick.py, docs/quality.md), about 5 minutes each on
# 2 cores: the quality recipes with the LR schedule fitted to the time left, only the final checkpoint
# evaluated (train.ckpt_every above any reachable step), smaller probe sets, and the smaller batches (and,
# for audio, the narrower encoder) that took the most steps within that time in the tries of docs/quality.md
QUICK_ONCE = ["train.time_schedule=true", "train.ckpt_every=100000"]
QUICK = {
    "image": DemoPlan("fashion-mnist", "fashion-mnist-quick", "image", "quality/image", [
        ("pretrain", ["--subset", "train", "--limit", "20000", "--samples-per-shard", "5000"]),
        ("probe-train", ["--subset", "train", "--limit", "10000", "--samples-per-shard", "5000"]),
        ("probe-test", ["--subset", "test", "--limit", "5000", "--samples-per-shard", "5000"])],
        overrides=[*QUICK_ONCE, "data.batch_size=128", "train.warmup_steps=10"], eval_minutes=1.5),
    "audio": DemoPlan("fsdd", "fsdd", "audio", "quality/audio", PLANS["audio"].splits,
                      overrides=[*QUICK_ONCE, "objective.backbone_args.width=16", "objective.backbone_args.out_dim=512",
                                 "data.batch_size=32", "train.warmup_steps=10", "train.steps=2000"],
                      eval_minutes=1.5, more_sets=PLANS["audio"].more_sets),
    "video": DemoPlan("fashion-mnist", "moving-fashion-mnist-quick", "video", "quality/video",
                      moving_splits(2000, 1000),
        targets=["motion", "cls"], eval_minutes=1.5,
        overrides=[*QUICK_ONCE, "data.batch_size=16", "train.warmup_steps=10", "train.steps=2000"]),
}


# data sets written beside the demos with `--write-sets` (docs/data.md), not yet part of any demo's recipe:
# `instruments` (dataset timgm6mb): the instrument-family probe set, General MIDI family labels, notes split so no
# (program, key) is in both splits (pipeline/sources/soundfont.py); `general-audio`: the unlabeled pretraining
# corpus, one `pretrain` split written from every installed part of jobs.data.GENERAL_AUDIO
INSTRUMENT_SPLITS = [
    ("probe-train", ["--source-type", "soundfont", "--subset", "train", "--seed", "0", "--samples-per-shard", "2000"]),
    ("probe-test", ["--source-type", "soundfont", "--subset", "test", "--seed", "0", "--samples-per-shard", "2000"])]
EXTRA_SETS = ("instruments", "general-audio")


def extra_set_writes(name: str, data: str | None) -> list[tuple[str, str, list[str]]]:
    """(source path, split, extra `shards write` args) that write the extra data set `name`; FileNotFoundError
    with the way to get it when its data is missing."""
    if name == "instruments":
        found = find_dataset("timgm6mb", data)
        if found is None:
            raise FileNotFoundError(missing_line("timgm6mb", data))
        return [(str(found / SOUNDFONT_FILE), split, extra) for split, extra in INSTRUMENT_SPLITS]
    if name == "general-audio":
        parts = general_audio_parts()
        if not parts:
            raise FileNotFoundError(f"none of the general-audio packages ({', '.join(p for p, _, _ in GENERAL_AUDIO)}) "
                                    "is installed: run `python -m selfsup.jobs.data --install-general-audio` as root")
        return [(path, "pretrain", ["--source-type", kind, "--subset", "all", "--samples-per-shard", "2000"])
                for path, kind in parts]
    raise ValueError(f"unknown data set {name!r}: valid: {', '.join(EXTRA_SETS)}")


def write_extra_sets(names: list[str], data: str | None, out: str) -> list[str]:
    """Write each named extra data set under OUT/data/<name> (reruns keep finished shards); their URLs."""
    urls = []
    for name in names:
        url = f"{out}/data/{name}"
        for source, split, extra in extra_set_writes(name, data):
            print(f"== shards: {name} {split} ← {source}", file=sys.stderr)
            cli("shards", "write", source, url, "--modality", "audio", "--split", split, "--quiet", *extra)
        urls.append(url)
    return urls


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
    data = f"{args.out}/data/{plan.folder}"
    eval_sets = [f"{plan.folder}={data}"]
    for folder, splits in [(plan.folder, plan.splits), *plan.more_sets]:
        for split, extra in splits:
            print(f"== shards: {folder} {split}", file=sys.stderr)
            cli("shards", "write", str(source), f"{args.out}/data/{folder}", "--modality", plan.modality,
                "--split", split, *extra)
        if folder != plan.folder:
            eval_sets.append(f"{folder}={args.out}/data/{folder}")
    run_dir = f"{args.out}/{plan.config.replace('/', '_')}" + ("_quick" if args.quick else "")
    # the evaluation below runs after pretraining: keep every checkpoint until it has been evaluated
    overrides = [f"run={run_dir}", f"data.sources=[{{url: {data}, split: pretrain}}]", "train.keep_unevaluated=true",
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
    print(f"\nselfsup demo ({args.modality}) done in {time.time() - t0:.0f} s; run folder {storage.redact_url(run_dir)}; "
          f"see `selfsup runs show {run_dir}`")
    return 0
