"""The training loop's time-fitted schedule: `fitted_horizon`, and a run that anneals within its time limit."""
from __future__ import annotations

from pathlib import Path


from selfsup.jobs.cli import main
from selfsup.pipeline.config import load_config
from selfsup.trainers import checkpoint as ck
from selfsup.trainers import run_folder as rf
from selfsup.trainers.config import PretrainConfig, validate
from selfsup.trainers.loop import fitted_horizon
from tests.conftest import FMNIST, ROOT

CONFIG = ROOT / "jobs" / "configs" / "simclr_image.yaml"
SMALL = ["data.batch_size=8", "data.mix=2", "data.streams=1", "data.backend=inline",
         "objective.backbone_args.width=8", "objective.args.proj_dim=32"]


def test_fitted_horizon_follows_the_pace() -> None:
    # 100 steps in 50 s of a 200 s budget: 300 more steps fit
    assert fitted_horizon(step=100, first=0, elapsed=50.0, limit=200.0, steps=10_000) == 400
    assert fitted_horizon(step=100, first=0, elapsed=50.0, limit=200.0, steps=250) == 250  # capped by steps
    assert fitted_horizon(step=150, first=100, elapsed=50.0, limit=200.0, steps=10_000) == 300  # resumed at 100
    assert fitted_horizon(step=100, first=0, elapsed=199.9, limit=200.0, steps=10_000) == 101  # never behind
    # at train.steps with time to spare the schedule ends there (finished, not stopped one step short)
    assert fitted_horizon(step=400, first=0, elapsed=50.0, limit=200.0, steps=400) == 400


def test_time_schedule_anneals_within_the_time_limit(tmp_path: Path) -> None:
    data = str(tmp_path / "fm")
    assert main(["shards", "write", str(FMNIST), data, "--modality", "image", "--split", "pretrain", "--limit", "64",
                 "--samples-per-shard", "16", "--workers", "1", "--quiet"]) == 0
    cfg = validate(load_config(PretrainConfig, str(CONFIG)))
    run = str(tmp_path / "run")
    args = [f"run={run}", f"data.sources=[{{url: {data}, split: pretrain}}]", *SMALL,
            "train.steps=1000000", "train.log_every=2", "train.ckpt_every=1000000", "train.warmup_steps=2",
            "train.time_limit_minutes=0.05", "train.time_schedule=true"]
    assert main(["pretrain", str(CONFIG), *args, "--no-ray", "--quiet"]) == 0
    lines = rf.read_metrics(run)
    last = lines[-1]
    assert 10 < last["step"] == last["horizon"] < 1_000_000, last  # ended by the time, at its own horizon
    assert last["lr"] < 0.1 * cfg.train.lr  # annealed, not cut off at the peak
    assert max(m["lr"] for m in lines) > 0.5 * cfg.train.lr
    status = rf.read_status(run)
    assert status is not None and status.state == rf.FINISHED and status.step == last["step"]
    assert [s for s, _ in ck.list_checkpoints(run)] == [last["step"]]
