"""`selfsup pretrain` on audio and video over a real local Ray cluster: 2 CPU workers (DDP),
Ray shard streams, checkpoints, `--stop-after` then `--resume` to completion, and for wav2vec 2.0
(Gumbel noise, dropout, sampled distractors) the same per-step losses as an uninterrupted run."""
from __future__ import annotations

import json
import math

import pytest

from selfsup.jobs.cli import main
from selfsup.pipeline import storage
from tests.conftest import FMNIST, FSDD, ROOT
from selfsup.trainers import checkpoint as ck

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
    """64 spoken digits (4 shards) and 32 moving Fashion-MNIST clips (4 shards), written once."""
    root = tmp_path_factory.mktemp("av-shards")
    out = {"wav2vec2_audio": str(root / "fsdd"), "mae_video": str(root / "moving-fashion-mnist")}
    common = ["--split", "pretrain", "--workers", "1", "--quiet"]
    assert main(["shards", "write", str(FSDD), out["wav2vec2_audio"], "--modality", "audio", "--limit", "64",
                 "--samples-per-shard", "16", *common]) == 0
    assert main(["shards", "write", str(FMNIST), out["mae_video"], "--modality", "video", "--source-type",
                 "moving-fashion-mnist", "--limit", "32", "--samples-per-shard", "8", *common]) == 0
    return out


def args(name: str, run: str, data: str, steps: int) -> list[str]:
    """Config, overrides for a small 2-worker CPU run, --quiet."""
    base = {"run": run, "data.sources": f"[{{url: {data}}}]", "train.steps": steps, "train.log_every": 1,
            "train.ckpt_every": 3, "train.warmup_steps": 2, "data.batch_size": 4, "data.mix": 2,
            "data.streams": 1, "data.stream_cpus": 0.25, "scaling.num_workers": 2, "scaling.cpus_per_worker": 0.5,
            **SMALL[name]}
    return ["pretrain", str(CONFIGS / f"{name}.yaml"), *[f"{k}={v}" for k, v in base.items()], "--quiet"]


def losses(run: str) -> dict[int, float]:
    """step → loss from metrics.jsonl (a step logged twice keeps its last value)."""
    out = {}
    for line in storage.read_text(storage.join(run, "metrics.jsonl")).splitlines():
        m = json.loads(line)
        out[m["step"]] = m["loss"]
    return out


def stop_then_resume(name: str, run: str, data: str, steps: int, stop: int) -> None:
    """Stop at `stop` with a checkpoint, then resume the same run folder to `steps`."""
    assert main([*args(name, run, data, steps), "--stop-after", str(stop)]) == 0
    assert json.loads(storage.read_text(storage.join(run, "status.json")))["state"] == "stopped"
    assert [s for s, _ in ck.list_checkpoints(run)] == [stop]
    assert main([*args(name, run, data, steps), "--resume"]) == 0
    assert json.loads(storage.read_text(storage.join(run, "status.json")))["state"] == "finished"


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


def test_wav2vec2_audio_resumes_to_the_same_losses(ray_cluster, tmp_path, av_shards):
    name, data = "wav2vec2_audio", av_shards["wav2vec2_audio"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    assert main(args(name, straight, data, 6)) == 0
    stop_then_resume(name, split, data, 6, 3)
    a, b = losses(straight), losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert all(math.isfinite(v) for v in a.values())
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    # 64 clips / batch 4 = 16 micro-batches an epoch, two per step
    check_checkpoints(split, {3: {"epoch": 0, "consumed": 6}, 6: {"epoch": 0, "consumed": 12}}, "wav2vec2", "audio")
    lines = [json.loads(x) for x in storage.read_text(storage.join(split, "metrics.jsonl")).splitlines()]
    assert all(m["targets"] > 0 and math.isfinite(m["code_perplexity"]) for m in lines)


def test_mae_video_stops_and_resumes_to_completion(ray_cluster, tmp_path, av_shards):
    name, data = "mae_video", av_shards["mae_video"]
    run = str(tmp_path / "mae-video")
    stop_then_resume(name, run, data, 6, 3)
    got = losses(run)
    assert sorted(got) == list(range(1, 7)) and all(math.isfinite(v) for v in got.values())
    # 32 clips / batch 4 = 8 micro-batches an epoch: the run crosses into epoch 1 after step 4
    check_checkpoints(run, {3: {"epoch": 0, "consumed": 6}, 6: {"epoch": 1, "consumed": 4}}, "mae", "video")
    lines = [json.loads(x) for x in storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()]
    assert all(m["mask_ratio"] == pytest.approx(58 / 64) for m in lines)  # tube masks: 58 of 64 places per slot
