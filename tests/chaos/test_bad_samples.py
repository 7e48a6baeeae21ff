"""Samples that kill their worker, and bad samples seen by every rank: nothing lost, nothing doubled.

A poison pill (tests/chaos/poison.py) SIGKILLs the process decoding it, as a decoder crash or
the OOM killer would. The feed must stop re-sending its batch after `max_deaths` deaths, find
the pill in an isolated worker, quarantine it, and deliver every other planned sample exactly
once with the same number of steps, on both backends.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from selfsup.pipeline import storage
from selfsup.pipeline.batch import KILLED, BatchMaker
from selfsup.pipeline.feed import BatchFeed, PoisonBatchError
from selfsup.pipeline.snapshot import SourceSpec, build_snapshot
from tests.chaos.poison import NAME, PoisonSpec
from tests.conftest import ARGS, add_shard, images, shard_keys

pytestmark = pytest.mark.usefixtures("ray_cluster")
PILL = "img-013"


@pytest.fixture(scope="module")
def pill(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """48 Fashion-MNIST JPEGs in two shards, one of them a poison pill."""
    dest = str(tmp_path_factory.mktemp("pill") / "ds")
    samples = images(48, {13})
    add_shard(dest, "pretrain-000000", samples[:24], NAME)
    add_shard(dest, "pretrain-000001", samples[24:], NAME)
    snap = build_snapshot([SourceSpec(url=dest, split="pretrain")])
    return {"snapshot": snap, "keys": shard_keys(snap)}


@pytest.mark.parametrize("backend", ["ray", "local"])
def test_a_sample_that_kills_its_worker_is_isolated_and_the_epoch_is_delivered_exactly_once(
        pill: dict[str, Any], backend: str, tmp_path) -> None:
    spec = PoisonSpec(pill["snapshot"], 8, modality_args=ARGS, seed=1)
    qurl = str(tmp_path / "quarantine.jsonl")
    with BatchFeed(spec, 0, 1, streams=2, prefetch=2, backend=backend, stream_cpus=0.25,
                   quarantine_url=qurl, max_deaths=2) as feed:
        steps = feed.steps_per_epoch()
        batches = [feed.next() for _ in range(steps)]
        assert feed.state_dict() == {"epoch": 0, "consumed": steps} and steps == 6
        assert feed.restarts >= 2  # the pill's batch killed a worker twice, then was isolated
    delivered = [(s, int(p)) for b in batches for s, p, v in zip(b["shard"], b["position"], b["valid"]) if v]
    assert sorted(delivered) == sorted(pill["keys"])  # every planned sample once, the pill's slot included
    flagged = {str(k) for b in batches for k in b["key"][b["quarantined"]]}
    assert flagged == {PILL}
    url = next(s.url for s in pill["snapshot"].shards if s.url.endswith("000000.tar"))
    maker = BatchMaker(spec)  # in this process: the pill is never decoded here
    for i, b in enumerate(batches):  # byte for byte what a healthy worker makes with the pill quarantined
        want = maker.make(0, i, frozenset({(url, PILL)}))
        for name in ("view1", "view2", "key", "position", "quarantined"):
            np.testing.assert_array_equal(b[name], want[name])
    records = [json.loads(line) for line in storage.read_text(qurl).splitlines()]
    assert [(r["key"], r["error"]) for r in records] == [(PILL, KILLED)]

    # a resumed feed knows the pill from the quarantine file: no worker dies, no record is repeated
    with BatchFeed(spec, 0, 1, streams=2, prefetch=2, backend=backend, stream_cpus=0.25, quarantine_url=qurl) as again:
        redo = [again.next() for _ in range(steps)]
        assert again.restarts == 0
    for b, r in zip(batches, redo):
        np.testing.assert_array_equal(b["view1"], r["view1"])
    assert len(storage.read_text(qurl).splitlines()) == 1


def test_a_batch_of_nothing_but_poison_stops_the_feed_naming_shard_and_keys(tmp_path) -> None:
    dest = str(tmp_path / "ds")
    add_shard(dest, "pretrain-000000", images(8, set(range(8)), prefix="pill"), NAME)
    spec = PoisonSpec(build_snapshot([SourceSpec(url=dest, split="pretrain")]), 4, modality_args=ARGS, seed=1)
    with BatchFeed(spec, 0, 1, streams=1, prefetch=1, backend="local", max_deaths=1) as feed:
        with pytest.raises(PoisonBatchError, match=r"every one of its 4 samples kills.*pretrain-000000\.tar pill-0"):
            feed.next()


def test_a_killer_under_on_error_raise_stops_naming_it(pill: dict[str, Any]) -> None:
    spec = PoisonSpec(pill["snapshot"], 8, modality_args=ARGS, seed=1, on_error="raise")
    with BatchFeed(spec, 0, 1, streams=1, prefetch=1, backend="local", max_deaths=1) as feed:
        with pytest.raises(PoisonBatchError, match=f"on_error=raise.*{PILL}"):
            for _ in range(feed.steps_per_epoch()):
                feed.next()


def test_every_rank_records_its_quarantined_samples(tmp_path) -> None:
    """Two Ray Train workers, one epoch over 64 images of which 8 are cut short: all 8 records land."""
    from selfsup.jobs.cli import main
    from tests.conftest import ROOT

    samples = images(64, set())
    bad = {f"img-{i:03d}" for i in range(3, 64, 8)}
    for key, members in samples:
        if key in bad:
            members["jpg"] = members["jpg"][: len(members["jpg"]) // 2]
    dest = str(tmp_path / "ds")
    add_shard(dest, "pretrain-000000", samples[:32], "image")
    add_shard(dest, "pretrain-000001", samples[32:], "image")
    run = tmp_path / "run"
    args = [f"run={run}", f"data.sources=[{{url: {dest}}}]", "data.batch_size=8", "data.backend=inline",
            "data.modality_args={size: 28, channels: 1}", "scaling.num_workers=2", "scaling.cpus_per_worker=0.5",
            "train.steps=4", "train.log_every=2", "train.warmup_steps=1", "train.ckpt_every=4",
            "objective.backbone_args.width=8"]
    assert main(["pretrain", str(ROOT / "jobs" / "configs" / "simclr_image.yaml"), *args, "--quiet"]) == 0
    records = [json.loads(line) for line in (run / "quarantine.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in records) == sorted(bad)  # each once, from both ranks
    assert {r["rank"] for r in records} == {0, 1}


def test_an_eval_batch_that_kills_its_worker_stops_naming_its_samples(pill: dict[str, Any]) -> None:
    from selfsup.trainers.features import extract

    spec = PoisonSpec(pill["snapshot"], 8, modality_args=ARGS, seed=1, train=False, label="cls")
    with pytest.raises(RuntimeError, match=f"kills the worker making it.*{PILL}"):
        extract(spec, {"raw": {"kind": "raw"}}, None, None, workers=1, use_ray=True, num_cpus=0.25)
