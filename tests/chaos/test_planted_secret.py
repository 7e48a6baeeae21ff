"""A secret planted in the storage options and in a URL appears in no file a run leaves."""
from __future__ import annotations

from pathlib import Path

import pytest

from selfsup.jobs.cli import main
from tests.conftest import FMNIST, PLANTED, ROOT, SECRETS, URL, leaks, run_cli

CONFIG = str(ROOT / "jobs" / "configs" / "simclr_image.yaml")


@pytest.fixture(scope="module")
def few_images(tmp_path_factory: pytest.TempPathFactory) -> str:
    dest = str(tmp_path_factory.mktemp("fm") / "fashion-mnist")
    res = run_cli("shards", "write", str(FMNIST), dest, "--modality", "image", "--limit", "64",
                  "--samples-per-shard", "32", "--workers", "1", "--quiet")
    assert res.returncode == 0, res.stderr
    return dest


def test_no_file_of_a_run_holds_a_planted_secret(tmp_path, few_images, capfd):
    run = tmp_path / "run"
    storage = ",".join(f"{k}: {v!r}" if isinstance(v, str) else f"{k}: {v}" for k, v in PLANTED.items())
    args = [f"run={run}", f"data.sources=[{{url: {few_images}}}]", "data.batch_size=16", "data.backend=inline",
            "train.steps=2", "train.log_every=1", "train.warmup_steps=1", "train.ckpt_every=2",
            "objective.backbone_args.width=8", f"storage={{{storage}}}", f"retrain.runs={URL}"]
    assert main(["pretrain", CONFIG, *args, "--no-ray", "--quiet"]) == 0
    written = sorted(p.name for p in run.rglob("*") if p.is_file())
    assert {"config.yaml", "status.json", "metrics.jsonl", "meta.json", "state.pt", "encoder.pt"} <= set(written)
    assert leaks(run, SECRETS) == {}
    out, err = capfd.readouterr()
    assert not [s for s in SECRETS if s in out + err]


def test_a_failed_run_records_its_error_without_secrets(tmp_path):
    from selfsup.jobs.training import mark_failed
    from selfsup.pipeline.config import from_dict
    from selfsup.trainers.config import PretrainConfig
    from selfsup.trainers import run_folder as rf

    cfg = from_dict(PretrainConfig, {"run": str(tmp_path / "run"), "storage": dict(PLANTED)})
    mark_failed(cfg, OSError(f"cannot read {URL}/train-000000.tar with options {PLANTED}"))
    assert rf.read_status(cfg.run).state == rf.FAILED
    assert leaks(tmp_path, SECRETS) == {}


def test_a_ray_run_hands_secrets_to_workers_but_records_none(tmp_path, few_images, ray_cluster, monkeypatch):
    """Ray Train keeps train_loop_config in its run settings: the secrets must not be there, nor in
    any file of the run or of Ray's session folder (the workers get them from the object store)."""
    import json

    import ray
    from ray.train.v2._internal.state.state_actor import get_state_actor

    monkeypatch.setenv("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")  # what the dashboard's Train view shows
    run = tmp_path / "run"
    storage = ",".join(f"{k}: {v!r}" if isinstance(v, str) else f"{k}: {v}" for k, v in PLANTED.items())
    args = [f"run={run}", f"data.sources=[{{url: {few_images}}}]", "data.batch_size=16", "data.backend=inline",
            "scaling.num_workers=1", "scaling.cpus_per_worker=0.5", "train.steps=2", "train.log_every=1",
            "train.warmup_steps=1", "train.ckpt_every=2", "objective.backbone_args.width=8",
            f"storage={{{storage}}}", f"retrain.runs={URL}"]
    assert main(["pretrain", CONFIG, *args, "--quiet"]) == 0
    assert (run / "checkpoints" / "step-000002" / "encoder.pt").is_file()
    runs = ray.get(get_state_actor().get_train_runs.remote())
    recorded = [json.dumps(r.model_dump(mode="json"), default=str) for r in runs.values()]
    assert any(str(run) in r for r in recorded), "the run's settings were not recorded where expected"
    assert not [s for s in SECRETS if any(s in r for r in recorded)]
    assert leaks(run, SECRETS) == {}
    session = Path(ray._private.worker._global_node.get_session_dir_path())  # noqa: SLF001
    assert leaks(session, SECRETS) == {}
