"""CorInfoMax through the registry: the loss against the paper's equations written out, the running
estimates' update rule and their place in the state_dict, gradients, learning, bad arguments."""
from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from selfsup.trainers.objectives import make_objective
from selfsup.trainers.objectives.corinfomax import logdet_loss

ARGS: dict[str, Any] = {"backbone": "convnet_small", "backbone_args": {"in_channels": 1, "width": 8},
                        "proj_dim": 6, "proj_hidden": 16, "sim_weight": 20.0, "la_r": 0.3, "la_mu": 0.2}


def build(**overrides: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return make_objective("corinfomax", modality="image", **{**ARGS, **overrides})


def batch(b: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    base = F.interpolate(torch.randn(b, 1, 7, 7, generator=g), size=28, mode="bilinear")
    return {"view1": base + 0.1 * torch.randn(base.shape, generator=g),
            "view2": torch.roll(base, 1, dims=3) + 0.1 * torch.randn(base.shape, generator=g)}


def reference(z1: torch.Tensor, z2: torch.Tensor, state: dict[str, torch.Tensor], sim_w: float, cov_w: float,
              la_r: float, la_mu: float, eps: float) -> tuple[float, dict[str, torch.Tensor]]:
    """The authors' loss written out with loops over samples and logdet as Σ log eigenvalues (float64)."""
    n, d = z1.shape
    new: dict[str, torch.Tensor] = {}
    cov = 0.0
    for k, z in (("1", z1.double()), ("2", z2.double())):
        mean = sum(z[i] for i in range(n)) / n
        mu = la_mu * state["mu" + k] + (1 - la_mu) * mean
        outer = sum(torch.outer(z[i] - mu, z[i] - mu) for i in range(n)) / n
        r = la_r * state["r" + k] + (1 - la_r) * outer
        eig = torch.linalg.eigvalsh(r + eps * torch.eye(d, dtype=torch.float64))
        cov += -float(torch.log(eig).sum()) / d
        new["mu" + k], new["r" + k] = mu, r
    mse = sum(float((z1[i, j] - z2[i, j]) ** 2) for i in range(n) for j in range(d)) / (n * d)
    return sim_w * mse + cov_w * cov, new


def projections(obj: torch.nn.Module, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The L2-normalized projections the objective computes (train-mode BatchNorm: batch statistics)."""
    n = b["view1"].shape[0]
    with torch.no_grad():
        z = F.normalize(obj.projector(obj.backbone(torch.cat([b["view1"], b["view2"]]))), dim=1)
    return z[:n], z[n:]


def test_loss_and_running_estimates_follow_the_papers_equations() -> None:
    obj, b = build(r_init=0.5), batch()
    g = torch.Generator().manual_seed(5)
    a = torch.randn(6, 6, dtype=torch.float64, generator=g)
    obj.r1.copy_(0.1 * a @ a.T + 0.5 * torch.eye(6, dtype=torch.float64))  # a past estimate, not the start
    obj.mu1.copy_(0.1 * torch.randn(6, dtype=torch.float64, generator=g))
    before = {k: getattr(obj, k).clone() for k in ("r1", "r2", "mu1", "mu2")}
    z1, z2 = projections(obj, b)
    want, new = reference(z1, z2, before, 20.0, 1.0, 0.3, 0.2, 1e-8)
    out = obj(b)
    assert out.loss.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    for k, v in new.items():  # the update rule: la·old + (1 - la)·batch, the covariance about the new mean
        torch.testing.assert_close(getattr(obj, k), v, rtol=1e-6, atol=1e-7)
    assert before["r2"].equal(0.5 * torch.eye(6, dtype=torch.float64))


def test_logdet_loss_equals_the_eigenvalue_sum_and_rewards_spread() -> None:
    r = torch.diag(torch.tensor([2.0, 0.5, 0.1], dtype=torch.float64))
    assert logdet_loss(r, 0.0).item() == pytest.approx(-math.log(2.0 * 0.5 * 0.1) / 3)
    assert logdet_loss(torch.eye(3, dtype=torch.float64), 0.0) < logdet_loss(r, 0.0)


def test_estimates_are_float64_buffers_in_the_state_dict_and_resume() -> None:
    obj, b = build(), batch()
    obj(b)
    state = obj.state_dict()
    for k in ("r1", "r2", "mu1", "mu2"):
        assert state[k].dtype == torch.float64 and not state[k].requires_grad
        assert k not in dict(obj.named_parameters())
    fresh = build()
    assert not fresh.r1.equal(state["r1"])
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.r1, obj.r1)
    torch.testing.assert_close(fresh(b).loss, obj(b).loss)  # the same estimates give the same next loss


def test_eval_mode_leaves_the_estimates_alone() -> None:
    obj, b = build(), batch()
    obj.eval()
    before = obj.r1.clone()
    obj(b)
    assert obj.r1.equal(before)


def test_every_trainable_parameter_gets_a_gradient() -> None:
    obj = build()
    out = obj(batch())
    assert torch.isfinite(out.loss) and out.embedding is not None and not out.embedding.requires_grad
    out.loss.backward()
    for n, p in obj.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


def test_loss_falls_on_a_fixed_batch() -> None:
    obj, b = build(la_r=0.01, la_mu=0.01), batch()  # the authors' factors: R_0 = I fades at once
    opt = torch.optim.AdamW(obj.param_groups(0.01), lr=1e-2)
    losses = []
    for step in range(8):
        out = obj(b)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        obj.after_step(step + 1, 8)
        losses.append(out.loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.1, losses


@pytest.mark.parametrize("arg,value", [("la_r", 1.0), ("la_mu", -0.1), ("r_init", 0.0), ("sim_weight", -1.0),
                                       ("r_eps", -1e-8)])
def test_bad_arguments_raise_naming_the_argument(arg: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"corinfomax {arg}="):
        build(**{arg: value})
