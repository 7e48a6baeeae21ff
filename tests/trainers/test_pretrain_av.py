"""`selfsup pretrain` on audio and video over a real local Ray cluster: 2 CPU workers (DDP),
Ray shard streams, checkpoints with their data positions; wav2vec 2.0 (Gumbel noise, dropout,
sampled distractors) stopped with `--stop-after`, then `--resume`d across an epoch boundary to
completion, gives the same per-step losses as an uninterrupted run.

Each Ray Train run costs far more to start than to train, so every run here serves several checks."""
from __future__ import annotations

import math

import pytest

from selfsup.jobs.cli import main
from selfsup.pipeline import storage
from selfsup.trainers import checkpoint as ck
from selfsup.trainers import run_folder as rf
from tests.conftest import FMNIST, FSDD, ROOT

CONFIGS = ROOT / "jobs" / "configs"
SMALL = {  # narrow models: the test is about the run machinery, not the model size
    "wav2vec2_audio": {
        "objective.backbone_args": "{conv_dim: 32, embed_dim: 32, num_layers: 1, num_heads: 2, ffn_dim: 64, "
                                   "pos_conv_kernel: 8, pos_conv_groups: 4}",
        "objective.args.codebook_size": 16, "objective.args.num_negatives": 10, "objective.args.final_dim": 32,
    },
    "mae_video": {"objective.args.decoder_dim": 64, "objective.args.decoder_depth": 1},
}


@pytest.fixture(scope="module")
def av_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """24 spoken digits and 24 moving Fashion-MNIST clips, 4 shards each, written once."""
    root = tmp_path_factory.mktemp("av-shards")
    out = {"wav2vec2_audio": str(root / "fsdd"), "mae_video": str(root / "moving-fashion-mnist")}
    common = ["--split", "pretrain", "--workers", "1", "--quiet"]
    assert main(["shards", "write", str(FSDD), out["wav2vec2_audio"], "--modality", "audio", "--limit", "24",
                 "--samples-per-shard", "6", *common]) == 0
    assert main(["shards", "write", str(FMNIST), out["mae_video"], "--modality", "video", "--source-type",
                 "moving-fashion-mnist", "--limit", "24", "--samples-per-shard", "6", *common]) == 0
    return out


def args(name: str, run: str, data: str, steps: int) -> list[str]:
    """Config, overrides for a small 2-worker CPU run, --quiet."""
    base = {"run": run, "data.sources": f"[{{url: {data}}}]", "train.steps": steps, "train.log_every": 1,
            "train.ckpt_every": 2, "train.warmup_steps": 2, "data.batch_size": 4, "data.mix": 2,
            "data.streams": 1, "data.stream_cpus": 0.25, "scaling.num_workers": 2, "scaling.cpus_per_worker": 0.5,
            **SMALL[name]}
    return ["pretrain", str(CONFIGS / f"{name}.yaml"), *[f"{k}={v}" for k, v in base.items()], "--quiet"]


def losses(run: str) -> dict[int, float]:
    """step → loss from metrics.jsonl (a step logged twice keeps its last value)."""
    return {m["step"]: m["loss"] for m in rf.read_metrics(run)}


def stop_then_resume(name: str, run: str, data: str, steps: int, stop: int) -> None:
    """Stop at `stop` with a checkpoint, then resume the same run folder to `steps`."""
    assert main([*args(name, run, data, steps), "--stop-after", str(stop)]) == 0
    assert rf.run_state(run) == rf.STOPPED
    assert [s for s, _ in ck.list_checkpoints(run)] == [stop]
    assert main([*args(name, run, data, steps), "--resume"]) == 0
    assert rf.run_state(run) == rf.FINISHED


def check_checkpoints(run: str, positions: dict[int, dict[str, int]], objective: str, modality: str) -> None:
    """Complete checkpoints at the steps of `positions`, each with meta.json naming what produced it
    and the data position (epoch, micro-batches consumed by both ranks together) it resumes from."""
    found = ck.list_checkpoints(run)
    assert [s for s, _ in found] == sorted(positions)
    for step, url in found:
        for name in (ck.META, ck.STATE, ck.ENCODER):
            assert storage.exists(storage.join(url, name)), (url, name)
        meta = ck.read_meta(url)
        assert (meta["step"], meta["objective"], meta["modality"], meta["world_size"]) == (step, objective, modality, 2)
        assert meta["data_position"] == positions[step]


@pytest.mark.e2e
def test_wav2vec2_audio_resumes_to_the_same_losses(ray_cluster, tmp_path, av_shards):
    name, data = "wav2vec2_audio", av_shards["wav2vec2_audio"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    assert main(args(name, straight, data, 4)) == 0
    stop_then_resume(name, split, data, 4, 2)
    a, b = losses(straight), losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 5))
    assert all(math.isfinite(v) for v in a.values())
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    # 24 clips / batch 4 = 6 micro-batches an epoch, two per step: the resumed steps 3-4 cross into epoch 1
    check_checkpoints(split, {2: {"epoch": 0, "consumed": 4}, 4: {"epoch": 1, "consumed": 2}}, "wav2vec2", "audio")
    lines = rf.read_metrics(split)
    assert all(m["targets"] > 0 and math.isfinite(m["code_perplexity"]) for m in lines)


@pytest.mark.e2e
def test_mae_video_trains_on_two_workers_into_the_next_epoch(ray_cluster, tmp_path, av_shards):
    name, data = "mae_video", av_shards["mae_video"]
    run = str(tmp_path / "mae-video")
    assert main(args(name, run, data, 4)) == 0  # stop and resume: the wav2vec 2.0 test above
    assert rf.run_state(run) == rf.FINISHED
    got = losses(run)
    assert sorted(got) == list(range(1, 5)) and all(math.isfinite(v) for v in got.values())
    # 24 clips / batch 4 = 6 micro-batches an epoch: the run crosses into epoch 1 after step 3
    check_checkpoints(run, {2: {"epoch": 0, "consumed": 4}, 4: {"epoch": 1, "consumed": 2}}, "mae", "video")
    lines = rf.read_metrics(run)
    assert all(m["mask_ratio"] == pytest.approx(58 / 64) for m in lines)  # tube masks: 58 of 64 places per slot
