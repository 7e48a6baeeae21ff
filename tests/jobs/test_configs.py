"""Every example config in jobs/configs/ loads, validates and trains two steps (in this process,
inline batches, small widths) on tiny real shards of its modality, ending in a checkpoint."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from selfsup.jobs.cli import main
from selfsup.pipeline import storage
from selfsup.pipeline.config import load_config
from selfsup.pipeline.modalities import make_modality
from selfsup.trainers import checkpoint as ck
from selfsup.trainers import load_encoder
from selfsup.trainers import run_folder as rf
from selfsup.trainers.config import PretrainConfig, validate
from selfsup.trainers.loop import build_objective
from tests.conftest import FMNIST, FSDD, ROOT

CONFIGS = sorted((ROOT / "jobs" / "configs").glob("*.yaml"))
DEMO_DATA = {"image": "fashion-mnist", "audio": "fsdd", "video": "moving-fashion-mnist"}
# source, items, items per shard, extra `shards write` arguments
SHARDS: dict[str, tuple[Path, int, int, list[str]]] = {
    "image": (FMNIST, 64, 16, []),
    "audio": (FSDD, 64, 16, []),
    "video": (FMNIST, 32, 8, ["--source-type", "moving-fashion-mnist"]),
}
# objective arguments shrunk where a config sets them
SMALL_ARGS = {"proj_dim": 32, "proj_hidden": 64, "pred_hidden": 64, "decoder_dim": 64, "decoder_depth": 1,
              "decoder_heads": 4, "codebook_size": 16, "num_negatives": 10, "final_dim": 32, "hidden": 32,
              "num_prototypes": 16, "queue_length": 8, "queue_start_step": 0, "freeze_prototypes_steps": 1}
TINY_WAV2VEC2 = {"conv_dim": 32, "embed_dim": 32, "num_layers": 1, "num_heads": 2, "ffn_dim": 64,
                 "pos_conv_kernel": 8, "pos_conv_groups": 4}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    """modality → a folder of tiny real shards, written on first use and kept for the module."""
    root = tmp_path_factory.mktemp("config-shards")
    written: set[tuple[str, str]] = set()

    def get(modality: str, splits: tuple[str, ...] = ("pretrain",)) -> str:
        dest = str(root / DEMO_DATA[modality])
        for split in splits:  # a labeled source (s4l) reads another split of the same folder
            if (modality, split) not in written:
                source, items, per_shard, extra = SHARDS[modality]
                code = main(["shards", "write", str(source), dest, "--modality", modality, "--split", split,
                             "--limit", str(items), "--samples-per-shard", str(per_shard), "--workers", "1",
                             "--quiet", *extra])
                assert code == 0
                written.add((modality, split))
        return dest

    return get


def small_overrides(cfg: PretrainConfig) -> list[str]:
    """Overrides that keep the config's recipe but make two steps cheap: batch 8, narrow models."""
    o = cfg.objective
    out = ["data.batch_size=8", "data.mix=2", "data.streams=1", "data.backend=inline", "train.steps=2",
           "train.log_every=1", "train.ckpt_every=2", "train.warmup_steps=1"]
    if "width" in o.backbone_args:
        out.append("objective.backbone_args.width=8")
    if o.backbone.startswith("wav2vec2"):
        out += [f"objective.backbone_args.{k}={v}" for k, v in TINY_WAV2VEC2.items()]
    out += [f"objective.args.{k}={v}" for k, v in SMALL_ARGS.items() if k in o.args]
    return out


def gpu_overrides(path: Path) -> list[str]:
    """The `key=value` overrides of the config's "# GPU scale:" comment (its continuation lines too)."""
    text, inside = [], False
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        inside = line.startswith("# GPU scale") or (inside and line.startswith("#  "))
        if inside:
            text.append(line)
    return re.findall(r"(?<!\S)([a-z_]+(?:\.[a-z_]+)+=\S+)", " ".join(text))


def metrics(run: str) -> list[dict[str, Any]]:
    return rf.read_metrics(run)


def test_every_modality_objective_pair_has_a_config() -> None:
    names = {p.stem for p in CONFIGS}
    expected = {f"{o}_image" for o in ("simclr", "byol", "barlow_twins", "mae", "corinfomax", "mixed_barlow_twins",
                                       "exemplar", "s4l")}
    expected |= {f"{o}_audio" for o in ("simclr", "byol", "barlow_twins", "mae", "wav2vec2", "corinfomax", "exemplar")}
    expected |= {f"{o}_video" for o in ("simclr", "byol", "mae", "corinfomax", "temporal_order")}
    assert expected <= names, sorted(expected - names)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_and_trains_two_steps(path: Path, shards: Callable[..., str], tmp_path: Path) -> None:
    cfg = validate(load_config(PretrainConfig, str(path)))
    # <objective>_<modality>, or <variant>_<objective>_<modality> for an option of an objective
    # (mixed_barlow_twins_image runs barlow_twins with its mixup on)
    assert path.stem.endswith(f"{cfg.objective.name}_{cfg.data.modality}")
    assert cfg.run == f"runs/{path.stem}"
    srcs = cfg.data.sources
    assert {s.url for s in srcs} == {f"runs/demo/data/{DEMO_DATA[cfg.data.modality]}"} and srcs[0].split == "pretrain"

    run = str(tmp_path / "run")
    data = shards(cfg.data.modality, tuple(s.split for s in srcs))
    sources = ", ".join(f"{{url: {data}, split: {s.split}"  # the config's splits, weights and targets, tiny shards
                        + "".join(f", {k}: {getattr(s, k)}" for k in ("weight", "target") if getattr(s, k)) + "}"
                        for s in srcs)
    args = [f"run={run}", f"data.sources=[{sources}]", *small_overrides(cfg)]
    assert main(["pretrain", str(path), *args, "--no-ray", "--quiet"]) == 0

    lines = metrics(run)
    assert [m["step"] for m in lines] == [1, 2]
    assert all(math.isfinite(m["loss"]) for m in lines), lines
    assert rf.run_state(run) == rf.FINISHED
    found = ck.list_checkpoints(run)
    assert [s for s, _ in found] == [2]
    for name in (ck.STATE, ck.ENCODER, ck.META):
        assert storage.exists(storage.join(found[0][1], name)), name
    meta = ck.read_meta(found[0][1])
    assert (meta["objective"], meta["modality"], meta["backbone"]) == (
        cfg.objective.name, cfg.data.modality, cfg.objective.backbone)
    assert load_encoder(run).selfsup_meta["step"] == 2
    assert meta["saw_labels"] == (cfg.objective.name == "s4l")  # evaluation tables mark such runs
    if any(s.target for s in srcs):
        assert any(m["labeled_frac"] > 0 for m in lines), lines  # the labeled source's rows reached the objective


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_gpu_scale_overrides_in_the_comment_build(path: Path) -> None:
    """The comment's overrides load, validate and build the objective (on the meta device: no memory)
    and the modality; a masked objective's token grid matches the one the modality's arrays make."""
    overrides = gpu_overrides(path)
    assert "scaling.use_gpu=true" in overrides, f"{path.name} has no '# GPU scale:' comment with overrides"
    cfg = validate(load_config(PretrainConfig, str(path), overrides))
    assert cfg.scaling.use_gpu
    with torch.device("meta"):
        objective = build_objective(cfg, data_size=60000)  # a Fashion-MNIST-sized snapshot (exemplar's classes)
    modality = make_modality(cfg.data.modality, **cfg.data.modality_args)
    spec = objective.mask_spec()
    if spec is not None:
        grid = modality.token_grid(spec["geometry"])
        expected = getattr(objective.backbone, "grid", None)
        assert expected is None or tuple(grid) == tuple(expected), (grid, expected)


@pytest.mark.parametrize("path", sorted((ROOT / "jobs" / "configs" / "quality").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_quality_config_builds(path: Path) -> None:
    """The tuned recipes `selfsup demo --quality` trains (their bars run in tests/quality) validate,
    and their objective and modality build; every one fits its schedule to the demo's time budget."""
    cfg = validate(load_config(PretrainConfig, str(path)))
    assert cfg.run == f"runs/quality_{path.stem}" and cfg.data.modality == path.stem
    assert cfg.train.time_schedule or path.stem == "video"
    with torch.device("meta"):
        objective = build_objective(cfg)
    assert objective.encoder().out_dim > 0
    make_modality(cfg.data.modality, **cfg.data.modality_args)
