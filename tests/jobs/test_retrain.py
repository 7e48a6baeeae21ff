"""`selfsup retrain`: new-data detection, warm start, evaluate-and-promote, leases on local folders and moto S3,
and resuming a run whose holder was killed. Training runs in-process without Ray (inline feeds)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from selfsup.jobs.cli import main
from selfsup.pipeline import storage
from selfsup.pipeline.lease import Lease, LeaseLost
from tests.conftest import FMNIST, ROOT
from selfsup.trainers import checkpoint as ck

CONFIG = str(ROOT / "jobs" / "configs" / "simclr_image.yaml")


def write(data: str, split: str, *extra: str) -> None:
    assert main(["shards", "write", str(FMNIST), data, "--modality", "image", "--split", split,
                 "--samples-per-shard", "100", "--workers", "1", "--quiet", *extra]) == 0


@pytest.fixture(scope="module")
def fm_template(tmp_path_factory) -> str:
    """200 pretrain, 200 probe-train and 100 probe-test images; tests copy it and append to their copy."""
    data = str(tmp_path_factory.mktemp("retrain") / "fm")
    write(data, "pretrain", "--limit", "200")
    write(data, "probe-train", "--limit", "200")
    write(data, "probe-test", "--subset", "test", "--limit", "100")
    return data


@pytest.fixture
def fm(fm_template, tmp_path) -> str:
    shutil.copytree(fm_template, tmp_path / "fm")
    return str(tmp_path / "fm")


def append(data: str, seed: int) -> None:
    """Another 100 pretrain images, as a new shard with a new manifest row."""
    write(data, "pretrain", "--limit", "100", "--seed", str(seed))


def overrides(runs: str, data: str, **extra: object) -> list[str]:
    base = {"run": runs, "data.sources": f"[{{url: {data}}}]", "train.steps": 20, "train.warmup_steps": 2,
            "train.lr": 3e-3, "train.seed": 1, "train.log_every": 5, "train.ckpt_every": 10, "data.batch_size": 64,
            "data.backend": "inline", "objective.backbone_args.width": 16, "retrain.metric": "knn"}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def retrain(runs: str, data: str, *args: str, **extra: object) -> int:
    return main(["retrain", CONFIG, *overrides(runs, data, **extra), "--no-ray", "--quiet", *args])


def log(runs: str) -> list[dict]:
    return [json.loads(x) for x in storage.read_text(storage.join(runs, "retrain-log.jsonl")).splitlines()]


def run_dirs(runs: str) -> list[str]:
    """Names of the run folders under the runs root."""
    return sorted(os.path.basename(u) for u in storage.listdir(runs)
                  if storage.exists(storage.join(u, "manifest.parquet")))


def test_schedule_skips_promotes_rejects_and_warm_starts(fm, tmp_path, capsys):
    runs = str(tmp_path / "runs")
    assert retrain(runs, fm) == 0  # first run: from scratch, must beat random init
    first = log(runs)
    assert [e["decision"] for e in first] == ["start", "promote"]
    assert first[0]["new_samples"] == 200 and "init_from" not in first[0]
    assert first[1]["accuracy"] > first[1]["random_init"]
    promoted = json.loads(storage.read_text(storage.join(runs, "promoted.json")))
    run1 = promoted["run"]
    assert promoted["step"] == 20 and promoted["checkpoint"].endswith("step-000020")
    assert ck.promoted_step(storage.join(runs, run1)) == 20  # retention keeps the promoted step

    assert retrain(runs, fm) == 0  # no new data: nothing starts
    assert log(runs)[-1]["decision"] == "skip" and log(runs)[-1]["new_samples"] == 0
    assert run_dirs(runs) == [run1]

    append(fm, seed=1)
    assert retrain(runs, fm, "--min-new-samples", "101") == 0  # 100 new < 101: still nothing
    assert log(runs)[-1]["decision"] == "skip" and log(runs)[-1]["new_samples"] == 100
    before = storage.read_text(storage.join(runs, "promoted.json"))
    assert retrain(runs, fm, **{"retrain.tolerance": -1.0}) == 0  # worse than promoted by more than -1: reject
    start, verdict = log(runs)[-2:]
    assert start["decision"] == "start" and start["new_samples"] == 100 and start["total_samples"] == 300
    assert start["init_from"] == promoted["checkpoint"]  # warm start from the promoted checkpoint
    assert verdict["decision"] == "reject" and verdict["promoted_accuracy"] == promoted["accuracy"]
    assert storage.read_text(storage.join(runs, "promoted.json")) == before
    assert retrain(runs, fm) == 0  # the rejected data is not retrained on the next tick
    assert log(runs)[-1]["decision"] == "skip"

    append(fm, seed=2)
    assert retrain(runs, fm, **{"retrain.tolerance": 1.0}) == 0
    start, verdict = log(runs)[-2:]
    assert start["decision"] == "start" and start["new_samples"] == 100 and start["total_samples"] == 400
    assert verdict["decision"] == "promote" and verdict["run"] == start["run"]
    now = json.loads(storage.read_text(storage.join(runs, "promoted.json")))
    assert now["run"] == start["run"] and now["step"] == 20
    saved = storage.read_text(storage.join(runs, start["run"], "config.yaml"))
    assert promoted["checkpoint"] in saved  # train.init_from recorded in the run's config
    assert len(run_dirs(runs)) == 3
    print("\n".join(json.dumps(e) for e in log(runs)))


def test_warm_start_loads_weights_with_a_fresh_optimizer(fm, tmp_path):
    base = str(tmp_path / "base")
    assert main(["pretrain", CONFIG, *overrides(base, fm, **{"train.steps": 2}), "--no-ray", "--quiet"]) == 0
    src = ck.latest_checkpoint(base)
    still = {"train.steps": 1, "train.lr": 1e-12, "train.weight_decay": 0.0, "train.warmup_steps": 0}
    warm, cold = str(tmp_path / "warm"), str(tmp_path / "cold")
    assert main(["pretrain", CONFIG, *overrides(warm, fm, **still, **{"train.init_from": src}), "--no-ray",
                 "--quiet"]) == 0
    assert main(["pretrain", CONFIG, *overrides(cold, fm, **still), "--no-ray", "--quiet"]) == 0

    def weights(ckpt: str) -> dict:  # parameters only: BatchNorm running statistics move without any lr
        return {k: v.float() for k, v in ck.load_torch(storage.join(ckpt, ck.ENCODER)).items() if "running_" not in k
                and v.is_floating_point()}

    a, b, c = weights(src), weights(ck.latest_checkpoint(warm)), weights(ck.latest_checkpoint(cold))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)  # without init_from: the seed's init
    state = ck.load_torch(storage.join(ck.latest_checkpoint(warm), ck.STATE))
    steps = [int(s["step"]) for s in state["optimizer"]["state"].values() if "step" in s]
    assert steps and max(steps) == 1  # the optimizer started fresh
    assert state["step"] == 1


def test_leases_exclude_expire_and_refuse_unsupported_storage(moto_s3, tmp_path, capsys):
    for root in (str(tmp_path), moto_s3.bucket("lease")):
        url = storage.join(root, "x.lease")
        a, b = Lease(url, 1.0), Lease(url, 1.0)
        assert a.acquire() is not None and b.acquire() is None
        a.update(run="r1")
        assert b.holder()["run"] == "r1"
        time.sleep(1.2)  # a stopped renewing: expired
        taken = b.acquire()
        assert taken is not None and taken.previous["run"] == "r1" and taken.previous["owner"] == a.owner
        with pytest.raises(LeaseLost):
            a.renew()
        b.release()
        c = Lease(url, 1.0)
        assert c.acquire().previous == {}  # released, not expired: nothing to resume
    with pytest.raises(ValueError, match="conditional writes"):
        Lease("memory://x/y.lease", 5)
    assert main(["retrain", CONFIG, "run=memory://runs", "data.sources=[{url: memory://d}]", "--no-ray"]) == 2
    assert "leases need conditional writes" in capsys.readouterr().err


@pytest.mark.e2e
def test_two_concurrent_retrains_on_s3_start_one_run(moto_s3, fm):
    bucket = moto_s3.bucket("rt")
    data, runs = f"{bucket}/fm", f"{bucket}/runs"
    for dirpath, _, files in os.walk(fm):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), fm)
            storage.upload_file(os.path.join(dirpath, f), storage.join(data, rel))
    cmd = [sys.executable, "-m", "selfsup.jobs.cli", "retrain", CONFIG, *overrides(runs, data, **{"train.steps": 4}),
           "--no-ray", "--quiet"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    decisions = [e["decision"] for e in log(runs)]
    assert decisions.count("start") == 1, decisions
    # the other invocation found the lease taken (or, had it come after the first ended, no new data)
    assert decisions.count("busy") + decisions.count("skip") == 1, decisions
    assert sum(d in ("promote", "reject") for d in decisions) == 1 and len(run_dirs(runs)) == 1, decisions


@pytest.mark.e2e
def test_killed_retrain_is_resumed_after_its_lease_expires(fm, tmp_path):
    runs = str(tmp_path / "runs")
    args = overrides(runs, fm, **{"train.steps": 40, "train.ckpt_every": 2, "retrain.lease_seconds": 4})
    proc = subprocess.Popen([sys.executable, "-m", "selfsup.jobs.cli", "retrain", CONFIG, *args, "--no-ray", "--quiet"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        names = run_dirs(runs) if os.path.isdir(runs) else []
        if names and ck.list_checkpoints(storage.join(runs, names[0])):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    [name] = run_dirs(runs)
    killed_at = ck.list_checkpoints(storage.join(runs, name))[-1][0]
    assert 2 <= killed_at < 40

    assert main(["retrain", CONFIG, *args, "--no-ray", "--quiet"]) == 0  # lease still live: nothing
    assert log(runs)[-1]["decision"] == "busy" and log(runs)[-1]["holder_run"] == name
    lease = json.loads(storage.read_text(storage.join(runs, "retrain.lease")))
    time.sleep(max(0.0, lease["expires"] - time.time()) + 0.2)

    assert main(["retrain", CONFIG, *args, "--no-ray", "--quiet"]) == 0
    entries = log(runs)
    assert [e["decision"] for e in entries][:3] == ["start", "busy", "resume"]
    resume = entries[2]
    assert resume["run"] == name and resume["from_step"] == killed_at and resume["previous_owner"] == lease["owner"]
    assert entries[-1]["decision"] in ("promote", "reject") and entries[-1]["run"] == name
    assert run_dirs(runs) == [name]  # the same run, not another
    status = json.loads(storage.read_text(storage.join(runs, name, "status.json")))
    assert status["state"] == "finished" and status["step"] == 40
    assert ck.read_meta(ck.latest_checkpoint(storage.join(runs, name)))["step"] == 40


def test_run_stopped_by_its_time_limit_is_handed_to_the_next_invocation(fm, tmp_path):
    runs = str(tmp_path / "runs")
    limited = {"train.steps": 10, "train.time_limit_minutes": 1e-6}  # stops at the first log step (5)
    assert retrain(runs, fm, **limited) == 0
    assert [e["decision"] for e in log(runs)] == ["start", "stopped"] and log(runs)[-1]["step"] == 5
    assert not storage.exists(storage.join(runs, "promoted.json"))
    assert retrain(runs, fm, **limited) == 0  # no lease wait: the run was handed over
    resume, verdict = log(runs)[-2:]
    assert resume["decision"] == "resume" and resume["from_step"] == 5 and "handed the run over" in resume["reason"]
    assert verdict["decision"] in ("promote", "reject") and verdict["step"] == 10
    assert len(run_dirs(runs)) == 1
