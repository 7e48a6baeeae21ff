"""The run folder module: one status schema for every writer, metrics lines, the saved config."""
from __future__ import annotations

import dataclasses
import json

import pytest

from selfsup.pipeline import storage
from selfsup.pipeline.config import load_config
from selfsup.trainers import run_folder as rf
from selfsup.trainers.config import PretrainConfig
from tests.conftest import ROOT


def test_every_writer_uses_one_status_schema(tmp_path):
    run = str(tmp_path / "run")
    running = rf.running_status(3, 10, {"step": 3, "loss": 1.5, "samples_per_s": 80.0, "stall_pct": 2.0,
                                        "warning": "spread low"})
    ended = [rf.RunStatus(state, step=10, steps=10, loss=0.5) for state in (rf.STOPPED, rf.FINISHED, rf.FAILED)]
    keys = set()
    for status in (running, *ended):
        rf.write_status(run, status, None)
        back = rf.read_status(run)
        assert back == status
        keys.add(tuple(json.loads(storage.read_text(rf.status_url(run)))))
    assert len(keys) == 1  # the same fields whoever wrote it
    assert running.pid and running.host and running.warning == "spread low" and not running.ended
    assert all(s.ended for s in ended) and set(rf.ENDED) == {rf.STOPPED, rf.FINISHED, rf.FAILED}


def test_status_reader_handles_missing_old_and_damaged_files(tmp_path):
    run = str(tmp_path / "run")
    assert rf.read_status(run) is None and rf.run_state(run) == rf.UNKNOWN
    storage.write_text(rf.status_url(run), json.dumps({"state": "finished", "step": 4, "old_field": 1}))
    old = rf.read_status(run)  # an older writer's file: unknown keys ignored, missing ones defaulted
    assert (old.state, old.step, old.steps, old.loss) == (rf.FINISHED, 4, 0, None)
    assert rf.run_state(run) == rf.FINISHED
    storage.write_text(rf.status_url(run), "{not json")
    with pytest.raises(ValueError, match="status.json is not a valid run status"):
        rf.read_status(run)
    storage.write_text(rf.status_url(run), json.dumps({"state": "paused"}))
    with pytest.raises(ValueError, match="'paused' is not one of running, stopped, finished, failed"):
        rf.read_status(run)


def test_metrics_append_read_all_and_last(tmp_path):
    for run in (str(tmp_path / "run"), "memory://rf-metrics/run"):
        assert rf.read_metrics(run) == [] and rf.last_metrics(run) == {}
        for step in (1, 2, 3):
            rf.append_metrics(run, {"step": step, "loss": 1.0 / step, "lr": 0.1})
        assert [m["step"] for m in rf.read_metrics(run)] == [1, 2, 3]
        assert rf.last_metrics(run) == {"step": 3, "loss": 1.0 / 3, "lr": 0.1}
        with pytest.raises(ValueError, match="needs step and loss"):
            rf.append_metrics(run, {"step": 4})
    storage.append_line(rf.metrics_url(str(tmp_path / "run")), "{torn")
    with pytest.raises(ValueError, match="line 4 is not JSON"):
        rf.read_metrics(str(tmp_path / "run"))


def test_config_round_trip_without_secrets(tmp_path):
    run = str(tmp_path / "run")
    cfg = load_config(PretrainConfig, str(ROOT / "jobs" / "configs" / "simclr_image.yaml"),
                      [f"run={run}", "storage.secret_access_key=hunter2", "storage.region=eu-west-1"])
    assert rf.read_config(run) is None
    rf.write_config(run, cfg)
    assert "hunter2" not in storage.read_text(rf.config_url(run))
    assert rf.read_config(run) == dataclasses.replace(cfg, storage={"region": "eu-west-1"})


def test_paths_follow_the_documented_layout():
    run = "s3://b/runs/a"
    assert [rf.config_url(run), rf.status_url(run), rf.metrics_url(run), rf.quarantine_url(run),
            rf.manifest_url(run), rf.eval_url(run, "loss.png")] == [
        f"{run}/config.yaml", f"{run}/status.json", f"{run}/metrics.jsonl", f"{run}/quarantine.jsonl",
        f"{run}/manifest.parquet", f"{run}/eval/loss.png"]
