"""Temporal order (VCOP) through the registry: the loss against the paper's head written out, gradients, learning."""
from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from selfsup.trainers.objectives import make_objective
from selfsup.trainers.objectives.temporal_order import pair_features

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread is faster on a shared machine
SMALL: dict[str, Any] = {"backbone": "video_cnn_small", "backbone_args": {"in_channels": 1, "width": 4},
                         "clips": 3, "hidden": 16}


def build(**overrides: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return make_objective("temporal_order", modality="video", **{**SMALL, **overrides})


def order_batch(b: int = 8, n: int = 3, t: int = 4, size: int = 8) -> dict[str, torch.Tensor]:
    """clips float [B, n, 1, t, size, size] of smooth noise and one random permutation label per row."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(b * n * t, 1, size // 2, size // 2, generator=g)
    clips = torch.nn.functional.interpolate(base, size=size, mode="bilinear").view(b, n, t, 1, size, size)
    return {"clips": clips.transpose(2, 3).contiguous(),
            "order": torch.randint(0, math.factorial(n), (b,), generator=g)}


def test_pair_features_concatenate_every_pair_in_order() -> None:
    f = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)  # [B, n, D]
    got = pair_features(f)
    pairs = [(i, j) for i in range(4) for j in range(4) if i < j]
    assert got.shape == (2, 6, 6)
    for p, (i, j) in enumerate(pairs):
        for row in range(2):
            assert got[row, p].tolist() == f[row, i].tolist() + f[row, j].tolist()


def test_loss_equals_vcop_cross_entropy_written_out() -> None:
    obj = build().eval()  # eval: BatchNorm on running stats and no dropout, so clip-by-clip passes agree
    batch = order_batch(b=4)
    loss = obj(batch).loss
    head, bb = obj.head, obj.backbone
    expected = 0.0
    with torch.no_grad():
        for row in range(4):
            f = [bb(batch["clips"][row: row + 1, i])[0] for i in range(3)]  # each sub-clip alone, [D]
            pair_out = []
            for i in range(3):
                for j in range(i + 1, 3):
                    pair_out.append(torch.relu(head.pair.weight @ torch.cat([f[i], f[j]]) + head.pair.bias))
            logits = head.classify.weight @ torch.cat(pair_out) + head.classify.bias  # [6]
            z = [float(v) for v in logits]
            y = int(batch["order"][row])
            expected += -(z[y] - math.log(sum(math.exp(v) for v in z))) / 4
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)


def test_finite_loss_and_every_parameter_gets_a_gradient() -> None:
    obj = build()
    out = obj(order_batch())
    assert math.isfinite(float(out.loss.detach())) and out.embedding is not None and out.embedding.shape == (8, 32)
    assert 0.0 <= out.metrics["order_acc"] <= 1.0
    out.loss.backward()
    for name, p in obj.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert float(obj.backbone.blocks[0][0].weight.grad.abs().sum()) > 0  # reaches the backbone's first conv


def test_loss_falls_on_a_fixed_batch() -> None:
    obj = build(dropout=0.0)
    batch = order_batch()
    opt = torch.optim.AdamW(obj.param_groups(0.01), lr=3e-3)
    losses = []
    for step in range(15):
        out = obj(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        obj.after_step(step + 1, 15)
        losses.append(float(out.loss.detach()))
    assert losses[0] == pytest.approx(math.log(6), abs=0.3)  # about chance at the start
    assert losses[-1] < 0.5 * losses[0], losses


def test_encoder_takes_clips_of_another_length() -> None:
    enc = build().encoder().eval()
    assert enc(torch.randn(2, 1, 8, 16, 16)).shape == enc(torch.randn(2, 1, 4, 16, 16)).shape == (2, 32)


def test_bad_modality_arguments_and_batches_raise() -> None:
    with pytest.raises(ValueError, match="data.modality='image'"):
        make_objective("temporal_order", modality="image", **SMALL)
    with pytest.raises(ValueError, match="clips=1"):
        build(clips=1)
    with pytest.raises(ValueError, match="dropout=1.0"):
        build(dropout=1.0)
    obj = build()
    with pytest.raises(ValueError, match=r"lacks \['order'\]"):
        obj({"clips": order_batch()["clips"]})
    with pytest.raises(ValueError, match="order_clips equal to objective.args.clips"):
        obj(order_batch(n=4))
