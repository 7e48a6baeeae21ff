"""The host-to-device path (trainers/staging.py) and the GPU options of the loop, on CPU: staged batches
equal unstaged ones and never change under the step, the checkpoint records the position of the batches
trained on, a staged run and its resume give the default path's losses bit for bit, and each GPU option
runs with the same loss within tolerance."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
import torch

from selfsup.jobs.cli import main
from selfsup.pipeline.config import load_config
from selfsup.trainers import run_folder as rf
from selfsup.trainers.config import PretrainConfig, validate
from selfsup.trainers.inputs import to_device
from selfsup.trainers.staging import DeviceStager
from selfsup.trainers.steptimer import StepTimer
from tests.conftest import ROOT, fmnist_shards

CONFIG = ROOT / "jobs" / "configs" / "simclr_image.yaml"
SMALL = ["data.batch_size=8", "data.mix=2", "data.streams=1", "data.backend=inline", "train.log_every=1",
         "train.warmup_steps=1", "objective.backbone_args.width=8", "objective.args.proj_dim=32"]


class CountingFeed:
    """Numbered numpy batches (uint8 views, a float wave, a bool mask) and the feed's position."""

    def __init__(self) -> None:
        self.consumed, self.last_wait_s = 0, 0.0

    def next(self) -> dict[str, Any]:
        i, self.consumed = self.consumed, self.consumed + 1
        rng = np.random.default_rng(i)
        return {"view1": rng.integers(0, 256, (2, 6, 6, 3), dtype=np.uint8),
                "wave": rng.standard_normal((2, 50)).astype(np.float32),
                "mask": rng.random((2, 9)) < 0.5, "key": np.array(["a", "b"])}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": 0, "consumed": self.consumed}


def test_staged_batches_equal_unstaged_and_survive_the_next_prefetch() -> None:
    expected = [to_device(b, torch.device("cpu")) for b in _batches(5)]
    feed = CountingFeed()
    stager = DeviceStager(feed, torch.device("cpu"), staged=True, clock=StepTimer(torch.device("cpu")))
    buffers: list[set[int]] = []
    for i in range(5):
        got = stager.next()
        buffers.append({t.data_ptr() for t in stager._buffers[i % 2].values()})  # noqa: SLF001
        assert stager.position == {"epoch": 0, "consumed": i + 1}  # the batch handed out, not the feed's
        kept = {k: v.clone() for k, v in got.items()}
        stager.prefetch()  # the next batch lands in the other set of reused buffers
        assert feed.consumed == i + 2
        assert set(got) == set(expected[i]) == {"view1", "wave", "mask"}
        for k in got:
            assert torch.equal(got[k], expected[i][k]) and torch.equal(got[k], kept[k]), (i, k)
    assert buffers[0] == buffers[2] == buffers[4] and buffers[1] == buffers[3]  # two sets, reused in turn
    assert not buffers[0] & buffers[1]


def _batches(n: int) -> list[dict[str, Any]]:
    feed = CountingFeed()
    return [feed.next() for _ in range(n)]


def test_unstaged_path_is_to_device() -> None:
    stager = DeviceStager(CountingFeed(), torch.device("cpu"), staged=False)
    ref = to_device(_batches(1)[0], torch.device("cpu"))
    got = stager.next()
    assert all(torch.equal(got[k], ref[k]) for k in ref) and stager.position["consumed"] == 1


@pytest.fixture(scope="module")
def fm(tmp_path_factory: pytest.TempPathFactory) -> str:
    return fmnist_shards(str(tmp_path_factory.mktemp("staging") / "fm"), 48, 16)


def _pretrain(run: str, data: str, *extra: str, stop: Optional[int] = None, resume: bool = False) -> dict[int, float]:
    args = ["pretrain", str(CONFIG), f"run={run}", f"data.sources=[{{url: {data}, split: pretrain}}]", *SMALL,
            "train.steps=4", "train.ckpt_every=2", *extra, "--no-ray", "--quiet"]
    args += (["--stop-after", str(stop)] if stop else []) + (["--resume"] if resume else [])
    assert main(args) == 0
    return {m["step"]: m["loss"] for m in rf.read_metrics(run)}


def test_staged_run_and_its_resume_give_the_default_losses_bit_for_bit(tmp_path: Path, fm: str) -> None:
    """Staging reads the feed one batch ahead; the checkpoint at step 2 must still say 2 batches (8 steps
    of 6 make an epoch of 48 samples: resuming at a wrong position would change the losses)."""
    default = _pretrain(str(tmp_path / "default"), fm)
    staged = str(tmp_path / "staged")
    _pretrain(staged, fm, "train.stage_batches=true", stop=2)
    resumed = _pretrain(staged, fm, "train.stage_batches=true", resume=True)
    assert resumed == default and sorted(default) == [1, 2, 3, 4]
    line = rf.read_metrics(staged)[-1]
    assert {"data_wait_ms", "h2d_ms", "fwd_bwd_ms", "optimizer_ms"} <= set(line)
    assert line["fwd_bwd_ms"] > 0 and line["optimizer_ms"] > 0


OPTIONS = {
    "channels_last": ["train.channels_last=true"],
    "fused_adamw": ["train.fused_adamw=true"],
    "cudnn_benchmark": ["train.cudnn_benchmark=true"],
    "compile": ["train.compile=true", "train.compile_backend=aot_eager"],  # dynamo + AOT autograd, no C++ build
}


def _two_steps(cfg: PretrainConfig, wrap: Any = None) -> list[float]:
    from selfsup.jobs.bench.train import Bench
    from selfsup.trainers.loop import train_step

    bench = Bench(cfg)
    model = wrap(bench.model) if wrap else bench.model
    timer, losses = StepTimer(bench.device), []
    with bench.feed() as feed:
        stager = DeviceStager(feed, bench.device, staged=False, channels_last=cfg.train.channels_last, clock=timer)
        for step in range(2):
            outs = train_step(cfg, 0, step, 2, model, bench.core, bench.optimizer, stager, timer, bench.device)
            losses += [float(o.loss.detach()) for o in outs]
    return losses


@pytest.fixture(scope="module")
def tiny_cfg(fm: str) -> PretrainConfig:
    return validate(load_config(PretrainConfig, str(CONFIG), [*SMALL, f"data.sources=[{{url: {fm}}}]", "train.steps=2"]))


@pytest.fixture(scope="module")
def reference(tiny_cfg: PretrainConfig) -> list[float]:
    return _two_steps(tiny_cfg)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_gpu_option_runs_with_the_same_loss_on_cpu(name: str, tiny_cfg: PretrainConfig, reference: list[float]) -> None:
    import dataclasses

    from selfsup.pipeline.config import parse_override, merge, from_dict, to_dict

    values = to_dict(tiny_cfg, secrets=True)
    for item in OPTIONS[name]:
        values = merge(values, parse_override(item))
    losses = _two_steps(from_dict(PretrainConfig, values))
    assert losses == pytest.approx(reference, rel=1e-4, abs=1e-5), (name, losses, reference)
    assert dataclasses.asdict(tiny_cfg.train)[name] is False  # off by default


def test_ddp_bucket_view_and_static_graph_run_with_the_same_loss(tiny_cfg: PretrainConfig, reference: list[float],
                                                                 tmp_path: Path) -> None:
    """DDP (gloo, one rank: the same code path as several) with gradient_as_bucket_view and static_graph."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from selfsup.trainers.speedups import ddp_options

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        losses = _two_steps(tiny_cfg, lambda m: DistributedDataParallel(m, **ddp_options(True, True)))
    finally:
        dist.destroy_process_group()
    assert losses == pytest.approx(reference, rel=1e-4, abs=1e-5)


def test_static_graph_is_refused_with_gradient_accumulation() -> None:
    from selfsup.pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"ddp_static_graph needs one forward per backward \(train.accum=1\)"):
        validate(load_config(PretrainConfig, str(CONFIG), ["train.ddp_static_graph=true", "train.accum=2"]))
