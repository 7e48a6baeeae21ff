"""`selfsup pretrain` on a real local Ray cluster: 2-worker CPU DDP, checkpoints on moto S3, exact
resume, restart after a killed worker, load_encoder from S3, and a run evaluated on GCS."""
from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from selfsup.jobs.cli import main
from selfsup.pipeline import storage
from tests.conftest import FMNIST, ROOT, check_run_and_evaluate_on_gcs, run_cli
from tests.conftest import pretrain_overrides as overrides
from selfsup.trainers import checkpoint as ck
from selfsup.trainers import run_folder as rf

CONFIG = str(ROOT / "jobs" / "configs" / "simclr_image.yaml")


@pytest.fixture(scope="module")
def fm_shards(moto_s3):
    """1200 Fashion-MNIST images in 6 shards on moto S3."""
    dest = moto_s3.bucket("fm") + "/fashion-mnist"
    res = run_cli("shards", "write", str(FMNIST), dest, "--modality", "image", "--limit", "1200",
                  "--samples-per-shard", "200", "--workers", "1", "--quiet")
    assert res.returncode == 0, res.stderr
    return dest


def losses(run: str) -> dict[int, float]:
    """step → loss from metrics.jsonl (a step logged twice after a restart keeps its last value)."""
    return {m["step"]: m["loss"] for m in rf.read_metrics(run)}


def test_two_worker_ddp_on_s3_and_load_encoder(ray_cluster, moto_s3, fm_shards):
    run = moto_s3.bucket("runs") + "/simclr"
    assert main(["pretrain", CONFIG, *overrides(run, fm_shards, 6, **{"train.ckpt_every": 3}), "--quiet"]) == 0
    found = ck.list_checkpoints(run)
    assert [s for s, _ in found] == [3, 6]
    status = rf.read_status(run)
    assert status.state == rf.FINISHED and status.step == 6 and status.checkpoint == found[-1][1]
    lines = rf.read_metrics(run)
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(m["loss"]) and m["samples_per_s"] > 0 and 0 <= m["stall_pct"] <= 100 for m in lines)
    meta = ck.read_meta(found[-1][1])
    assert meta["world_size"] == 2 and meta["backbone"] == "convnet_small" and meta["step"] == 6
    assert meta["data_position"] == {"epoch": 0, "consumed": 12}
    assert "testing-secret" not in storage.read_text(rf.config_url(run))

    # load_encoder from S3 == the encoder inside the training state
    from selfsup.trainers import load_encoder
    from selfsup.trainers.config import PretrainConfig
    from selfsup.pipeline.config import from_dict
    from selfsup.trainers.loop import build_objective

    enc = load_encoder(run)
    assert enc.selfsup_meta["step"] == 6
    objective = build_objective(from_dict(PretrainConfig, meta["config"]))
    objective.load_state_dict(ck.load_torch(storage.join(found[-1][1], ck.STATE))["model"])
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(enc(x), objective.encoder().eval()(x))


def test_a_run_and_its_evaluation_on_gcs(fake_gcs, fm_on_gcs):
    """Data, run folder, trainer lease, metrics and checkpoints on gs:// (one process, inline feed)."""
    run = fake_gcs.bucket("runs") + "/inline"
    storage_args = {f"storage.{k}": v for k, v in fake_gcs.options.items()}
    args = overrides(run, fm_on_gcs, 2, **{"train.ckpt_every": 2, "data.batch_size": 32, "data.backend": "inline"},
                     **storage_args)
    assert main(["pretrain", CONFIG, *args, "--no-ray", "--quiet"]) == 0
    check_run_and_evaluate_on_gcs(run, fm_on_gcs, fake_gcs.options, steps=2, world_size=1)


def test_resume_gives_the_same_losses(ray_cluster, tmp_path, fm_shards):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    assert main(["pretrain", CONFIG, *overrides(straight, fm_shards, 8), "--quiet"]) == 0
    assert main(["pretrain", CONFIG, *overrides(split, fm_shards, 8), "--stop-after", "4", "--quiet"]) == 0
    assert rf.run_state(split) == rf.STOPPED
    assert [s for s, _ in ck.list_checkpoints(split)] == [4]
    # without --resume an existing run is refused; with it, it continues at the exact data position
    assert main(["pretrain", CONFIG, *overrides(split, fm_shards, 8), "--quiet"]) == 2
    assert main(["pretrain", CONFIG, *overrides(split, fm_shards, 8), "--resume", "--quiet"]) == 0
    a, b = losses(straight), losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


def test_train_engine_stops_resumes_and_leaves_a_refused_run_alone(tmp_path, fm_shards):
    """The engine that `pretrain` and `retrain` share, called with typed options (no Ray, inline feed)."""
    from selfsup.jobs.training import TrainOptions, train
    from selfsup.pipeline.config import load_config
    from selfsup.trainers.config import PretrainConfig, validate

    run = str(tmp_path / "engine")
    cfg = validate(load_config(PretrainConfig, CONFIG, overrides(run, fm_shards, 4, **{"data.backend": "inline"})))
    first = train(cfg, TrainOptions(use_ray=False, stop_after=2, quiet=True))
    assert first.stopped and first.step == 2 and first.checkpoint.endswith("step-000002")
    status = rf.read_status(run)
    assert (status.state, status.step, status.steps, status.checkpoint) == (rf.STOPPED, 2, 4, first.checkpoint)
    with pytest.raises(ValueError, match="pass --resume"):
        train(cfg, TrainOptions(use_ray=False, quiet=True))
    assert rf.run_state(run) == rf.STOPPED  # a refused start is not a failed run
    done = train(cfg, TrainOptions(use_ray=False, resume=True, quiet=True))
    assert (done.state, done.step, done.stopped) == (rf.FINISHED, 4, False)
    assert [m["step"] for m in rf.read_metrics(run)] == [1, 2, 3, 4]


def test_resume_under_other_data_settings_is_refused_unless_allowed(tmp_path, fm_shards):
    """A resume after batch 64 → 32 would skip or repeat samples: refused naming the setting; with
    --allow-plan-change it goes on under the new plan from the start of the next epoch."""
    from selfsup.jobs.training import TrainOptions, train
    from selfsup.pipeline.config import load_config
    from selfsup.trainers.config import PretrainConfig, validate

    run = str(tmp_path / "plan")
    first = validate(load_config(PretrainConfig, CONFIG, overrides(run, fm_shards, 6, **{"data.backend": "inline"})))
    assert train(first, TrainOptions(use_ray=False, stop_after=2, quiet=True)).step == 2
    assert ck.read_meta(ck.latest_checkpoint(run))["data_position"] == {"epoch": 0, "consumed": 2}
    changed = validate(load_config(PretrainConfig, CONFIG, overrides(
        run, fm_shards, 6, **{"data.backend": "inline", "data.batch_size": 32, "train.seed": 7})))
    with pytest.raises(ValueError, match=r"data\.batch_size: 64 → 32; train\.seed: 0 → 7.*--allow-plan-change"):
        train(changed, TrainOptions(use_ray=False, resume=True, quiet=True))
    assert ck.read_meta(ck.latest_checkpoint(run))["step"] == 2  # refused before anything ran
    assert train(first, TrainOptions(use_ray=False, resume=True, stop_after=3, quiet=True)).step == 3  # same: fine
    done = train(changed, TrainOptions(use_ray=False, resume=True, allow_plan_change=True, quiet=True))
    assert (done.state, done.step) == (rf.FINISHED, 6)
    meta = ck.read_meta(done.checkpoint)
    assert meta["data_position"] == {"epoch": 1, "consumed": 3}  # 3 steps of batch 32 from epoch 1's start
    assert meta["config"]["data"]["batch_size"] == 32


def _kill_a_train_worker(run: str, at_step: int, done: threading.Event, killed: list) -> None:
    """SIGKILL rank 0's process (status.json names it) once the run passes `at_step`."""
    while not done.is_set():
        try:
            status = rf.read_status(run)
        except (OSError, ValueError):
            status = None
        if status is not None and status.step >= at_step and status.pid:
            os.kill(status.pid, signal.SIGKILL)
            killed.append(status.pid)
            return
        time.sleep(0.2)


def test_killed_worker_is_restarted_from_the_last_checkpoint(ray_cluster, tmp_path, fm_shards):
    run = str(tmp_path / "failing")
    done, killed = threading.Event(), []
    watcher = threading.Thread(target=_kill_a_train_worker, args=(run, 6, done, killed), daemon=True)
    watcher.start()
    try:
        code = main(["pretrain", CONFIG, *overrides(run, fm_shards, 14, **{"train.ckpt_every": 4,
                                                                          "scaling.max_failures": 2}),
                     "--quiet"])
    finally:
        done.set()
        watcher.join(5)
    assert killed, "the test never found a train worker to kill"
    assert code == 0
    assert rf.read_status(run).step == 14
    steps = [m["step"] for m in rf.read_metrics(run)]
    assert steps[-1] == 14 and max(steps) == 14
    assert len(steps) > len(set(steps)), "no step was repeated: the run did not restart from a checkpoint"
    assert [s for s, _ in ck.list_checkpoints(run)][-1] == 14
