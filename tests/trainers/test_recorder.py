"""Rank 0's metrics writer: metrics.jsonl, status, TensorBoard event files and MLflow, off the step."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from selfsup.jobs.training import TrainOptions, train
from selfsup.pipeline import storage
from selfsup.pipeline.config import load_config
from selfsup.trainers import checkpoint as ck
from selfsup.trainers import run_folder as rf
from selfsup.trainers.config import PretrainConfig
from selfsup.trainers.recorder import MetricsRecorder, RunFolderSink
from tests.chaos.s3proxy import S3Proxy
from tests.conftest import PLANTED, ROOT, SECRETS, URL, fmnist_shards, leaks, read_tb_scalars

CONFIG = str(ROOT / "jobs" / "configs" / "simclr_image.yaml")
TINY = ["data.batch_size=8", "data.mix=2", "data.streams=1", "data.backend=inline", "objective.backbone_args.width=8",
        "objective.args.proj_dim=16", "train.warmup_steps=1", "train.log_every=1"]
TRAIN_TAGS = {"train/loss", "train/lr", "train/samples_per_s", "train/stall_pct", "train/emb_spread"}


@pytest.fixture(scope="module")
def fm(tmp_path_factory: pytest.TempPathFactory) -> str:
    return fmnist_shards(str(tmp_path_factory.mktemp("recorder") / "fm"), 64, 32)


def config(run: str, data: str, *more: str) -> PretrainConfig:
    return load_config(PretrainConfig, CONFIG, [f"run={run}", f"data.sources=[{{url: {data}}}]", *TINY, *more])


def test_tensorboard_event_files_hold_every_logged_step(fm, tmp_path):
    run = str(tmp_path / "run")
    train(config(run, fm, "train.steps=6", "train.ckpt_every=3"), TrainOptions(use_ray=False, quiet=True))
    lines = rf.read_metrics(run)
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    scalars = read_tb_scalars(rf.tb_url(run))
    assert TRAIN_TAGS <= set(scalars), sorted(scalars)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([m["loss"] for m in lines], rel=1e-6)
    assert len(list(Path(rf.tb_url(run)).glob("events.out.tfevents.*"))) == 2  # one whole file per checkpoint
    off = str(tmp_path / "off")
    train(config(off, fm, "train.steps=2", "train.ckpt_every=2", "train.tensorboard=false"),
          TrainOptions(use_ray=False, quiet=True))
    assert len(rf.read_metrics(off)) == 2 and not Path(rf.tb_url(off)).exists()


def test_a_slow_store_does_not_slow_the_step_and_everything_lands(fm, moto_s3, tmp_path):
    """Every PUT of metrics.jsonl and status.json is held 0.4 s: done in the step, 8 log steps took
    at least 6.4 s; off the step, the lines' timestamps (taken in the step) span far less."""
    delay, steps = 0.4, 8
    with S3Proxy(moto_s3.endpoint) as proxy:
        run = f"{moto_s3.bucket('slow')}/run"
        cfg = dataclasses.replace(config(run, fm, f"train.steps={steps}", f"train.ckpt_every={steps}"),
                                  storage={"endpoint_url": proxy.endpoint})
        held = [proxy.hold("PUT", name, delay, nth=0) for name in ("/metrics.jsonl", "/status.json")]
        train(cfg, TrainOptions(use_ray=False, quiet=True))
        lines = rf.read_metrics(run, cfg.storage_options)
        span = lines[-1]["time"] - lines[0]["time"]
        print(f"step loop {span:.2f} s for {steps} log steps; {sum(h.fired for h in held)} held PUTs of "
              f"{delay} s (in the step they would add {2 * steps * delay:.1f} s)")
        assert [m["step"] for m in lines] == list(range(1, steps + 1))
        assert sum(h.fired for h in held) >= 2  # the writes did go through the slow proxy
        assert span < steps * delay, span
        tb = read_tb_scalars(rf.tb_url(run), cfg.storage_options)
        assert [s for s, _ in tb["train/loss"]] == [m["step"] for m in lines]
        assert rf.read_status(run, cfg.storage_options).state == rf.FINISHED


def test_a_failed_store_fails_the_flush_naming_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    recorder = MetricsRecorder([RunFolderSink(str(blocker / "run"), 10)])
    recorder.record({"step": 1, "loss": 1.0})  # returns at once: the write fails in the writer thread
    with pytest.raises(OSError, match="file/run"):
        recorder.flush()
    recorder.record({"step": 2, "loss": 1.0})
    recorder.close(failed=True)  # training already raised: logged, not raised over that error
    with pytest.raises(ValueError, match="needs step and loss"):
        MetricsRecorder([]).record({"step": 1})


def test_mlflow_gets_params_metrics_by_step_and_the_encoder_but_no_secret(fm, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed: pip install -e '.[mlflow]'")
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store for opt-ins
    run, uri = str(tmp_path / "run"), f"file://{tmp_path}/mlruns"
    cfg = config(run, fm, "train.steps=4", "train.ckpt_every=2", f"train.mlflow_uri={uri}", f"retrain.runs={URL}")
    cfg = dataclasses.replace(cfg, storage=dict(PLANTED))
    train(cfg, TrainOptions(use_ray=False, quiet=True, stop_after=2))
    train(cfg, TrainOptions(use_ray=False, quiet=True, resume=True))  # goes on logging into the same run
    client = MlflowClient(tracking_uri=uri)
    (found,) = client.search_runs([client.get_experiment_by_name("selfsup").experiment_id])
    assert found.info.run_id == rf.read_mlflow_run(run) and found.info.status == "FINISHED"
    params = found.data.params
    assert params["train.lr"] == str(cfg.train.lr) and params["objective.name"] == "simclr"
    assert not [k for k in params if k.startswith("storage")]
    history = client.get_metric_history(found.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert {m.step: m.value for m in history} == pytest.approx({m["step"]: m["loss"] for m in rf.read_metrics(run)})
    local = client.download_artifacts(found.info.run_id, "encoder", str(tmp_path / "art"))
    step4 = storage.join(run, ck.CHECKPOINTS, ck.step_dir_name(4))
    assert (Path(local) / ck.ENCODER).read_bytes() == storage.read_bytes(storage.join(step4, ck.ENCODER))
    assert torch.load(Path(local) / ck.ENCODER, weights_only=True)
    assert leaks(tmp_path / "mlruns", SECRETS) == {} and leaks(Path(run), SECRETS) == {}


def test_mlflow_uri_without_mlflow_names_the_extra(fm, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what an environment without the extra imports
    run = str(tmp_path / "run")
    with pytest.raises(ValueError, match=r"train.mlflow_uri=http://tracking:5000 .*pip install 'selfsup\[mlflow\]'"):
        train(config(run, fm, "train.mlflow_uri=http://tracking:5000"), TrainOptions(use_ray=False, quiet=True))
    assert not Path(run).exists()  # refused before anything was written
