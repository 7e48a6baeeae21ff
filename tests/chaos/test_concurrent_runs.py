"""One live trainer per run folder: a second one is refused, a trainer whose lease another took
stops at once writing nothing more, and a retrain that loses its lease stops its trainer with a
checkpoint. Training runs in-process without Ray (inline feeds); the faults are real competing
writes to the lease objects."""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, Callable

import pytest

from selfsup.jobs.cli import main
from selfsup.jobs.training import RunTaken, TrainerLease, TrainOptions, train
from selfsup.pipeline import storage
from selfsup.pipeline.config import load_config
from selfsup.trainers import checkpoint as ck
from selfsup.trainers import run_folder as rf
from selfsup.trainers.config import PretrainConfig, validate
from tests.conftest import FMNIST, ROOT

CONFIG = str(ROOT / "jobs" / "configs" / "simclr_image.yaml")


@pytest.fixture(scope="module")
def fm(tmp_path_factory: pytest.TempPathFactory) -> str:
    data = str(tmp_path_factory.mktemp("runs") / "fm")
    for split, extra in (("pretrain", ["--limit", "256"]), ("probe-train", ["--limit", "200"]),
                         ("probe-test", ["--subset", "test", "--limit", "100"])):
        assert main(["shards", "write", str(FMNIST), data, "--modality", "image", "--split", split,
                     "--samples-per-shard", "128", "--workers", "1", "--quiet", *extra]) == 0
    return data


def overrides(run: str, data: str, **extra: object) -> list[str]:
    base = {"run": run, "data.sources": f"[{{url: {data}}}]", "train.steps": 400, "train.warmup_steps": 2,
            "train.log_every": 1, "train.ckpt_every": 2, "data.batch_size": 32, "data.backend": "inline",
            "objective.backbone_args.width": 8, "retrain.metric": "knn"}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def config(run: str, data: str, **extra: object) -> PretrainConfig:
    return validate(load_config(PretrainConfig, CONFIG, overrides(run, data, **extra)))


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def go() -> None:
        try:
            out["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread, out


def wait_for_checkpoint(run: str, thread: threading.Thread, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline and thread.is_alive():
        found = ck.list_checkpoints(run) if storage.exists(run) else []
        if found and storage.exists(storage.join(found[-1][1], ck.META)):
            return found[-1][0]
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def someone_else(url: str, opts: dict[str, Any] | None = None) -> None:
    """Another holder's live lease body written over the lease: what a taker does once it expired."""
    storage.write_bytes(url, json.dumps({"owner": "intruder-1", "expires": time.time() + 600,
                                         "released": False}).encode(), opts)


def test_a_second_live_trainer_of_a_run_folder_is_refused(fm, tmp_path):
    run = str(tmp_path / "run")
    cfg = config(run, fm, **{"train.steps": 30})
    thread, out = in_thread(lambda: train(cfg, TrainOptions(use_ray=False, quiet=True)))
    wait_for_checkpoint(run, thread)
    with pytest.raises(ValueError, match="is being trained by another trainer"):
        train(cfg, TrainOptions(use_ray=False, resume=True, quiet=True))
    thread.join(300)
    assert "error" not in out and out["result"].state == rf.FINISHED and out["result"].step == 30
    assert [m["step"] for m in rf.read_metrics(run)] == list(range(1, 31))  # one writer: each step once
    assert json.loads(storage.read_text(rf.trainer_lease_url(run)))["released"] is True


def test_the_trainer_lease_on_object_storage_refuses_a_second_trainer_and_is_released(object_store):
    """TrainerLease on s3:// and gs://: created, replaced and released by conditional writes."""
    run, opts = object_store.bucket("lease") + "/run", object_store.options
    url = rf.trainer_lease_url(run)
    cfg = config(run, "unused-data", **{f"storage.{k}": v for k, v in (opts or {}).items()})
    with TrainerLease(cfg, TrainOptions(lease_seconds=30)) as held:
        with pytest.raises(ValueError, match="is being trained by another trainer"):
            TrainerLease(cfg, TrainOptions()).__enter__()
        assert held.lease is not None
        held.lease.update(stop="asked")  # a replace matched to the version this trainer wrote
        assert not held.lost
    body = json.loads(storage.read_text(url, opts))
    assert body["released"] is True and body["stop"] == "asked" and body["owner"] == held.lease.owner
    with TrainerLease(cfg, TrainOptions(lease_seconds=30)) as again:  # a released lease is free to take
        someone_else(url, opts)
        assert again.lost
    assert json.loads(storage.read_text(url, opts))["owner"] == "intruder-1"  # leaving did not overwrite it


def test_a_trainer_whose_lease_was_taken_stops_at_once_writing_nothing_more(fm, tmp_path):
    run = str(tmp_path / "run")
    cfg = config(run, fm)
    thread, out = in_thread(lambda: train(cfg, TrainOptions(use_ray=False, quiet=True, lease_seconds=30)))
    wait_for_checkpoint(run, thread)
    someone_else(rf.trainer_lease_url(run))
    taken_at = rf.last_metrics(run)["step"]
    thread.join(120)
    assert isinstance(out.get("error"), RunTaken), out
    assert "taken over by another trainer (intruder-1)" in str(out["error"])
    last = rf.last_metrics(run)["step"]
    assert last <= taken_at + 1  # stopped at the next log step
    assert ck.list_checkpoints(run)[-1][0] <= taken_at + 1
    assert rf.read_status(run).state == rf.RUNNING  # its status is the new holder's to write, not this one's
    assert json.loads(storage.read_text(rf.trainer_lease_url(run)))["owner"] == "intruder-1"  # not released


def started(runs: str) -> bool:
    """Whether a retrain run under `runs` has a checkpoint yet."""
    if not storage.exists(runs):
        return False
    return any(ck.list_checkpoints(u) for u in storage.listdir(runs) if os.path.isdir(u))


def test_a_retrain_that_loses_its_lease_stops_its_trainer_with_a_checkpoint(fm, tmp_path):
    runs = str(tmp_path / "runs")
    args = overrides(runs, fm, **{"retrain.lease_seconds": 3})  # renewed every second
    thread, out = in_thread(lambda: main(["retrain", CONFIG, *args, "--no-ray", "--quiet"]))
    deadline = time.time() + 120
    while time.time() < deadline and not started(runs):
        time.sleep(0.05)
    someone_else(storage.join(runs, "retrain.lease"))
    thread.join(120)
    assert out.get("result") == 1, out
    entries = [json.loads(x) for x in storage.read_text(storage.join(runs, "retrain-log.jsonl")).splitlines()]
    assert [e["decision"] for e in entries] == ["start", "lost-lease"]
    run = storage.join(runs, entries[-1]["run"])
    status = rf.read_status(run)
    assert status.state == rf.STOPPED and "lost retrain.lease" in status.warning
    assert status.step == entries[-1]["step"] < 400
    assert ck.read_meta(ck.latest_checkpoint(run))["step"] == status.step  # checkpointed where it stopped
    assert not storage.exists(storage.join(runs, "promoted.json"))
