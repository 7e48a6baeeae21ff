"""The paper-scale recipes of jobs/configs/gpu/: each loads, validates and builds at full size (on the meta
device), states the throughput its paper or repository reports (or that none was found), resolves its
per-GPU hyper-parameters for 1 and 8 workers as the papers scale them, and trains two steps on CPU at a
tiny resolution with the architecture unchanged."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable

import pytest
import torch

from selfsup.jobs.cli import main
from selfsup.pipeline.config import load_config
from selfsup.pipeline.modalities import make_modality
from selfsup.trainers.config import PretrainConfig, validate
from selfsup.trainers.loop import build_objective
from selfsup.trainers.scaling import hyper_parameters
from tests.conftest import FMNIST, FSDD, ROOT

GPU = ROOT / "jobs" / "configs" / "gpu"
CONFIGS = sorted(GPU.glob("*.yaml"))
RECIPES = {"simclr_resnet50", "byol_resnet50", "barlow_twins_resnet50", "mae_vit_b16", "videomae_vit_b", "wav2vec2_base"}
# the smallest input each architecture takes unchanged: ResNet-50 downsamples 32×; ViT-B/16 needs patches
# left visible under the mask (MAE: 4 patches, 1 seen; VideoMAE: 9 places per time slot, 1 seen)
TINY = {
    "simclr_resnet50": ["data.modality_args.size=32"],
    "byol_resnet50": ["data.modality_args.size=32"],
    "barlow_twins_resnet50": ["data.modality_args.size=32"],
    "mae_vit_b16": ["data.modality_args.size=32", "objective.backbone_args.img_size=32"],
    "videomae_vit_b": ["data.modality_args.size=48", "objective.backbone_args.img_size=48"],
    "wav2vec2_base": ["data.modality_args.seconds=1.0"],
}
SHARDS = {"image": (FMNIST, []), "audio": (FSDD, []), "video": (FMNIST, ["--source-type", "moving-fashion-mnist"])}


def load(path: Path, *overrides: str) -> PretrainConfig:
    return validate(load_config(PretrainConfig, str(path), list(overrides)))


def header(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# "))
    return " ".join(lines)


def test_the_six_paper_recipes_are_there() -> None:
    assert {p.stem for p in CONFIGS} == RECIPES


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_builds_at_paper_scale_and_states_its_throughput(path: Path) -> None:
    cfg = load(path)
    assert cfg.scaling.use_gpu and cfg.train.bf16
    args = cfg.data.modality_args
    if cfg.data.modality == "audio":
        assert args["sample_rate"] == 16000 and cfg.objective.backbone == "wav2vec2_base"
    else:
        assert args["size"] == 224 and args["channels"] == 3
    if cfg.data.modality == "video":
        assert args["frames"] == 16 and cfg.objective.args["mask_ratio"] == 0.9
    with torch.device("meta"):
        objective = build_objective(cfg)
    spec = objective.mask_spec()
    if spec is not None and cfg.objective.backbone.startswith("vit"):
        grid = make_modality(cfg.data.modality, **args).token_grid(spec["geometry"])
        assert tuple(grid) == tuple(objective.backbone.grid)  # type: ignore[attr-defined]
    text = header(path)
    assert "Throughput" in text, f"{path.name}: no throughput line"
    assert re.search(r"not found|paper|repository|PRETRAIN", text.split("Throughput", 1)[1]), text


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_hyper_parameters_follow_the_global_batch_as_the_papers_scale_them(path: Path) -> None:
    cfg = load(path)
    one, eight = hyper_parameters(cfg, 1), hyper_parameters(cfg, 8)
    assert eight["global_batch"] == 8 * one["global_batch"] == 8 * cfg.data.batch_size * cfg.train.accum
    if cfg.train.base_lr is not None:  # linear scaling (Goyal et al.): lr = base_lr × global / 256
        assert one["lr"] == pytest.approx(cfg.train.base_lr * one["global_batch"] / cfg.train.lr_batch)
        assert eight["lr"] == pytest.approx(8 * one["lr"])
    else:  # wav2vec 2.0 keeps its lr (and its global batch through train.accum)
        assert eight["lr"] == one["lr"] == cfg.train.lr
    assert cfg.train.samples and cfg.train.warmup_samples
    for hp in (one, eight):  # the same epochs and warmup in samples, whatever the world size
        assert hp["steps"] == math.ceil(cfg.train.samples / hp["global_batch"])
        assert abs(hp["warmup_steps"] * hp["global_batch"] - cfg.train.warmup_samples) <= hp["global_batch"]
    # a resolved config resolves to itself (config.yaml holds it; a resume must not scale twice)
    from selfsup.trainers.scaling import resolve

    once = resolve(cfg, 8)
    assert resolve(once, 8) == once and resolve(once, 1) == resolve(cfg, 1)


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    root, written = tmp_path_factory.mktemp("gpu-config-shards"), {}

    def get(modality: str) -> str:
        if modality not in written:
            source, extra = SHARDS[modality]
            dest = str(root / modality)
            assert main(["shards", "write", str(source), dest, "--modality", modality, "--split", "pretrain",
                         "--limit", "4", "--samples-per-shard", "2", "--workers", "1", "--quiet", *extra]) == 0
            written[modality] = dest
        return written[modality]

    return get


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
@pytest.mark.e2e
def test_recipe_trains_two_steps_on_cpu_at_a_tiny_size(path: Path, tiny_shards: Callable[[str], str]) -> None:
    """The loop's own step (trainers/loop.py's train_step) with the recipe's GPU options (channels_last,
    fused AdamW, LARS...) on CPU, batch 2, the architecture as at 224 px."""
    from selfsup.jobs.bench.train import Bench
    from selfsup.trainers.loop import train_step
    from selfsup.trainers.staging import DeviceStager
    from selfsup.trainers.steptimer import StepTimer

    modality = load(path).data.modality
    cfg = load(path, *TINY[path.stem], "data.batch_size=2", "data.mix=1", "data.streams=1", "data.backend=inline",
               f"data.sources=[{{url: {tiny_shards(modality)}, split: pretrain}}]", "train.samples=4",
               "train.warmup_samples=2")
    bench = Bench(cfg)
    before = [p.detach().clone() for p in bench.core.parameters() if p.requires_grad][:4]
    with bench.feed() as feed:
        timer = StepTimer(bench.device)
        stager = DeviceStager(feed, bench.device, cfg.data.mean, cfg.data.std, staged=True, channels_last=cfg.train.channels_last, clock=timer)
        losses = []
        for step in range(2):
            outs = train_step(cfg, 0, step, 2, bench.model, bench.core, bench.optimizer, stager, timer, bench.device)
            losses += [float(o.loss.detach()) for o in outs]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), losses
    after = [p for p in bench.core.parameters() if p.requires_grad][:4]
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "the optimizer changed nothing"
    assert set(timer.take()) == {"data_wait_ms", "h2d_ms", "fwd_bwd_ms", "optimizer_ms"}


def test_show_hyper_prints_the_resolved_values_and_cpu_recipes_keep_theirs(capsys: pytest.CaptureFixture) -> None:
    from selfsup.trainers.scaling import resolve

    path = GPU / "mae_vit_b16.yaml"
    assert main(["pretrain", str(path), "scaling.num_workers=8", "--show-hyper"]) == 0
    line = capsys.readouterr().out
    assert "global batch 2048; lr 0.0012 (base_lr 0.00015 × 2048/256); warmup 25023 steps; 500456 steps" in line
    for cpu_recipe in sorted((ROOT / "jobs" / "configs").glob("*.yaml")):  # no scaling fields: unchanged
        cfg = load(cpu_recipe)
        assert resolve(cfg, 8) is cfg, cpu_recipe.name
