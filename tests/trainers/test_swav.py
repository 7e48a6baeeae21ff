"""SwAV through the registry: Sinkhorn against the paper's Algorithm, the swapped-prediction loss
against its formula, gradients and the prototype freeze, the queue in the state_dict, learning."""
from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from selfsup.trainers.inputs import to_device
from selfsup.trainers.objectives import OBJECTIVES, make_objective
from selfsup.trainers.objectives.swav import distributed_sinkhorn, swapped_prediction_loss

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL: dict[str, Any] = {"backbone": "convnet_small", "backbone_args": {"in_channels": 1, "width": 8},
                         "num_prototypes": 12, "proj_dim": 16, "proj_hidden": 32, "freeze_prototypes_steps": 0}


def build(**overrides: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return make_objective("swav", modality="image", **{**SMALL, **overrides})


def crops_batch(b: int = 8, k: int = 2) -> dict[str, torch.Tensor]:
    """Two noisy 28 px views of smooth random images and k 12 px local crops of their corners."""
    g = torch.Generator().manual_seed(1)
    base = F.interpolate(torch.randn(b, 1, 7, 7, generator=g), size=28, mode="bilinear")
    view1 = base + 0.1 * torch.randn(base.shape, generator=g)
    view2 = torch.roll(base, shifts=2, dims=3) + 0.1 * torch.randn(base.shape, generator=g)
    corners = [base[:, :, i * 8: i * 8 + 16, i * 8: i * 8 + 16] for i in range(k)]
    local = torch.stack([F.interpolate(c, size=12, mode="bilinear") for c in corners], dim=1)  # [B, K, 1, 12, 12]
    return {"view1": view1, "view2": view2, "local": local + 0.1 * torch.randn(local.shape, generator=g)}


def sinkhorn_loops(scores: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """The paper's Algorithm 1 (Sinkhorn-Knopp) with explicit loops over prototypes and samples."""
    n, k = scores.shape
    q = [[math.exp(float(scores[i, j]) / eps) for i in range(n)] for j in range(k)]  # [K][N]
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iters):
        for j in range(k):  # each prototype's row sums to 1/K
            r = sum(q[j])
            q[j] = [v / r / k for v in q[j]]
        for i in range(n):  # each sample's column sums to 1/N
            c = sum(q[j][i] for j in range(k))
            for j in range(k):
                q[j][i] = q[j][i] / c / n
    return torch.tensor([[q[j][i] * n for j in range(k)] for i in range(n)], dtype=torch.float64)  # [N, K]


def unit_scores(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Cosine scores [N, K] of random unit embeddings and prototypes, as SwAV makes them."""
    g = torch.Generator().manual_seed(seed)
    z, c = F.normalize(torch.randn(n, 8, generator=g), dim=1), F.normalize(torch.randn(k, 8, generator=g), dim=1)
    return (z @ c.T).double()


@pytest.mark.parametrize("eps, iters", [(0.05, 3), (0.3, 1), (0.01, 5)])
def test_sinkhorn_equals_the_papers_algorithm(eps: float, iters: int) -> None:
    scores = unit_scores(7, 5)
    got = distributed_sinkhorn(scores, eps, iters)
    assert got.dtype == torch.float64 and got.shape == (7, 5)
    torch.testing.assert_close(got, sinkhorn_loops(scores, eps, iters), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(distributed_sinkhorn(scores.float(), eps, iters).double(), got, rtol=1e-5, atol=1e-6)


def test_sinkhorn_codes_are_assignments_with_equal_cluster_sizes() -> None:
    scores = unit_scores(12, 4, seed=3)
    q = distributed_sinkhorn(scores, 0.5, 200)
    assert (q >= 0).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(12, dtype=torch.float64))  # each sample: one unit
    torch.testing.assert_close(q.sum(dim=0), torch.full((4,), 3.0, dtype=torch.float64))  # N/K per prototype
    tiny = distributed_sinkhorn(unit_scores(12, 4).float(), 0.002, 3)  # exp(±500): needs the max shift
    assert torch.isfinite(tiny).all() and torch.allclose(tiny.sum(dim=1), torch.ones(12))


def test_swapped_prediction_equals_the_formula() -> None:
    g = torch.Generator().manual_seed(0)
    scores = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(4)]  # 2 global + 2 local crops
    codes = [torch.softmax(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=1) for _ in range(2)]
    t = 0.1

    def log_p(s: torch.Tensor, b: int, j: int) -> float:
        return float(s[b, j]) / t - math.log(sum(math.exp(float(s[b, m]) / t) for m in range(4)))

    expected = 0.0
    for i in range(2):  # codes of global crop i, predicted from each of the 3 other crops
        for v in (v for v in range(4) if v != i):
            expected += sum(-float(codes[i][b, j]) * log_p(scores[v], b, j) for b in range(3) for j in range(4)) / 3 / 3
    got = swapped_prediction_loss(scores, codes, t)
    assert got.item() == pytest.approx(expected / 2, rel=1e-10)


def test_registered_and_gradients_reach_backbone_and_prototypes_except_while_frozen() -> None:
    assert "swav" in OBJECTIVES
    for freeze, local_crops in ((0, 2), (5, 2), (0, 0)):
        obj = build(freeze_prototypes_steps=freeze)
        batch = crops_batch(k=max(local_crops, 1))
        if not local_crops:
            batch.pop("local")
        out = obj(batch)
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
        assert out.embedding is not None and out.embedding.shape == (8, obj.backbone.out_dim)
        out.loss.backward()
        for n, p in obj.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
            frozen = freeze > 0 and n == "prototypes.weight"
            assert (p.grad.abs().sum() == 0) == frozen, (n, freeze)
        assert out.metrics["prototypes_frozen"] == float(freeze > 0)
        torch.testing.assert_close(obj.prototypes.weight.norm(dim=1), torch.ones(12))


def test_prototypes_unfreeze_after_the_set_steps_and_resume_keeps_the_count() -> None:
    obj = build(freeze_prototypes_steps=2)
    opt = torch.optim.SGD(obj.parameters(), lr=0.1)
    grads = []
    for step in range(3):
        opt.zero_grad()
        obj(crops_batch()).loss.backward()
        grads.append(obj.prototypes.weight.grad.abs().sum().item())
        opt.step()
        obj.after_step(step + 1, 3)
    assert grads[0] == grads[1] == 0 < grads[2]
    resumed = build(freeze_prototypes_steps=2)
    resumed.load_state_dict(obj.state_dict())
    resumed(crops_batch()).loss.backward()
    assert resumed.prototypes.weight.grad.abs().sum() > 0  # step 3 of 2 frozen ones, not step 0


def test_queue_starts_fills_is_used_and_persists_through_the_state_dict() -> None:
    obj = build(queue_length=16, queue_start_step=1)
    batch = crops_batch()  # B = 8: two steps fill the 16 rows
    used = []
    for step in range(4):
        used.append(obj(batch).metrics["queue_used"])
        obj.after_step(step + 1, 4)
        rows = int((obj.queue.abs().sum(dim=2) > 0).sum(dim=1).min())
        assert rows == min(8 * step, 16), (step, rows)
    assert used == [0.0, 0.0, 0.0, 1.0]
    torch.testing.assert_close(obj.queue.norm(dim=2), torch.ones(2, 16))  # unit embeddings, one queue per crop
    state = obj.state_dict()
    assert state["queue"].shape == (2, 16, 16) and int(state["steps_done"]) == 4
    resumed = build(queue_length=16, queue_start_step=1)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.queue, obj.queue)
    with torch.no_grad():
        torch.testing.assert_close(resumed(batch).loss, obj(batch).loss)  # codes from the same queue
    assert resumed(batch).metrics["queue_used"] == 1.0


def test_queue_scores_join_sinkhorn_once_full() -> None:
    """With a full queue, a sample's codes depend on the queued rows: they equal Sinkhorn over [queue; batch]."""
    obj = build(queue_length=8).eval()
    torch.manual_seed(2)
    obj.queue.copy_(F.normalize(torch.randn(2, 8, 16), dim=2))
    obj._host = None  # the host-side fill count is read again from the buffer
    z = F.normalize(torch.randn(4, 16), dim=1)
    w = obj.prototypes.weight.detach()
    got = obj.codes(0, z @ w.T, z)
    expected = distributed_sinkhorn(torch.cat([obj.queue[0] @ w.T, z @ w.T]), 0.05, 3)[-4:]
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, distributed_sinkhorn(z @ w.T, 0.05, 3))


def test_loss_falls_on_a_fixed_batch() -> None:
    obj = build()
    batch = crops_batch()
    opt = torch.optim.AdamW(obj.param_groups(0.01), lr=3e-3)
    losses = []
    for step in range(10):
        out = obj(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        obj.after_step(step + 1, 10)
        losses.append(out.loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert all(math.isfinite(v) for v in losses) and last < 0.5 * first, losses


@pytest.mark.parametrize("arg, value", [("num_prototypes", 0), ("temperature", 0.0), ("epsilon", -0.1),
                                        ("sinkhorn_iterations", 0), ("queue_length", -1),
                                        ("queue_start_step", -2), ("freeze_prototypes_steps", -1)])
def test_invalid_arguments_raise_naming_them(arg: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"swav {arg}="):
        build(**{arg: value})


def test_missing_views_raise_naming_the_fields() -> None:
    with pytest.raises(ValueError, match=r"swav needs batch fields \['view1', 'view2'\]"):
        build()({"image": torch.zeros(2, 1, 28, 28)})


def test_local_crops_reach_the_objective_channels_first_and_normalized() -> None:
    """uint8 local crops [B, K, S, S, C] become [B, K, C, S, S], each crop normalized as an image is."""
    import numpy as np

    rng = np.random.default_rng(0)
    batch = {name: rng.integers(0, 256, shape, dtype=np.uint8) for name, shape in
             (("view1", (2, 28, 28, 1)), ("view2", (2, 28, 28, 1)), ("local", (2, 3, 12, 12, 1)))}
    out = to_device(batch, torch.device("cpu"))
    assert out["local"].shape == (2, 3, 1, 12, 12) and out["local"].dtype == torch.float32
    crop = torch.from_numpy(batch["local"][1, 2]).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(out["local"][1, 2], (crop - 0.5) / 0.25)
    assert build()(out).loss.isfinite()
