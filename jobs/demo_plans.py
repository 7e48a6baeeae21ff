"""The demos' data plans and the engine that writes their shards: what `selfsup demo` and
`selfsup bench methods` pretrain on and probe with.

A plan names a dataset, the `shards write` arguments of each split (pretrain, probe-train,
probe-test), the probe targets, further eval-only sets, and the data sets written from other sources
(`EXTRA_SETS`: the instrument-family probe set, the general-audio corpus) that it evaluates on or mixes
into pretraining. `write_plan_data` writes (or completes: finished shards are kept) every split of a
plan and returns its eval sets and pretraining sources.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

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
    extra_eval: tuple[str, ...] = ()                 # EXTRA_SETS evaluated too; skipped with a line when missing
    pretrain_weight: float = 1.0                     # the pretrain split's mixing weight beside extra_pretrain
    extra_pretrain: tuple[tuple[str, float], ...] = ()  # (EXTRA_SETS name, weight) mixed into pretraining


@dataclass(frozen=True)
class PlanData:
    """What `write_plan_data` wrote: eval sets as (name, folder URL), the pretraining folder's set first,
    and the pretraining sources (folder URL, weight)."""

    eval_sets: list[tuple[str, str]]
    pretrain: list[tuple[str, float]]
    missing: list[str] = field(default_factory=list)  # extra eval sets skipped: one line each, with how to get them

    def sources_override(self) -> str:
        """`data.sources=[...]`, the pretrain split of every pretraining folder with its weight."""
        items = ", ".join(f"{{url: {url}, split: pretrain, weight: {w:g}}}" for url, w in self.pretrain)
        return f"data.sources=[{items}]"


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
        ("probe-test", ["--include", "_theo_", "--samples-per-shard", "500"])], more_sets=[FSDD_CUSTOMARY],
        extra_eval=("instruments",)),
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
                      more_sets=PLANS["audio"].more_sets, extra_eval=PLANS["audio"].extra_eval),
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
                      eval_minutes=2.5, more_sets=PLANS["audio"].more_sets, extra_eval=PLANS["audio"].extra_eval),
    "video": DemoPlan("fashion-mnist", "moving-fashion-mnist-quick", "video", "quality/video",
                      moving_splits(2000, 1000),
        targets=["motion", "cls"], eval_minutes=1.5,
        overrides=[*QUICK_ONCE, "data.batch_size=16", "train.warmup_steps=10", "train.steps=2000"]),
}


def write_plan_data(plan: DemoPlan, source: Path, data_root: str, quiet: bool = False,
                    data: str | None = None) -> PlanData:
    """Write (or complete) every split of `plan` under `data_root/<folder>`, and its extra sets under
    `data_root/<name>` (found under `data`, as `--data` says). An extra eval set whose data is missing is skipped
    with a line on stderr; a missing extra pretraining set raises FileNotFoundError with the way to get it.
    RuntimeError when a write fails."""
    from selfsup.jobs.cli import main

    sets: list[tuple[str, str]] = []
    for folder, splits in [(plan.folder, plan.splits), *plan.more_sets]:
        dest = f"{data_root}/{folder}"
        for split, extra in splits:
            print(f"== shards: {folder} {split}", file=sys.stderr)
            code = main(["shards", "write", str(source), dest, "--modality", plan.modality, "--split", split,
                         *extra, *(["--quiet"] if quiet else [])])
            if code:
                raise RuntimeError(f"shards write {folder} {split} failed (exit {code})")
        sets.append((folder, dest))
    pretrain = [(sets[0][1], plan.pretrain_weight)] if sets else []
    for name, weight in plan.extra_pretrain:
        pretrain.append((write_extra_set(name, data, f"{data_root}/{name}", plan.modality), weight))
    missing = []
    for name in plan.extra_eval:
        try:
            sets.append((name, write_extra_set(name, data, f"{data_root}/{name}", plan.modality)))
        except FileNotFoundError as e:
            print(f"skipping the eval set {name}: {e}", file=sys.stderr)
            missing.append(f"{name}: {e}")
    return PlanData(sets, pretrain, missing)


# data sets from other sources (docs/data.md), written by the plans that name them or alone with `--write-sets`:
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


def write_extra_set(name: str, data: str | None, url: str, modality: str = "audio") -> str:
    """Write (or complete) the extra data set `name` at `url`; returns `url`. FileNotFoundError when its data
    is missing, RuntimeError when a write fails."""
    from selfsup.jobs.cli import main

    for source, split, extra in extra_set_writes(name, data):
        print(f"== shards: {name} {split} ← {source}", file=sys.stderr)
        code = main(["shards", "write", source, url, "--modality", modality, "--split", split, "--quiet", *extra])
        if code != 0:
            raise RuntimeError(f"writing {name} {split} from {source} failed (exit {code})")
    return url


def write_extra_sets(names: list[str], data: str | None, out: str) -> list[str]:
    """Write each named extra data set under OUT/data/<name> (reruns keep finished shards); their URLs."""
    return [write_extra_set(name, data, f"{out}/data/{name}") for name in names]
