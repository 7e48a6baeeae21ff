"""Batch-level mixing on the device (trainers/objectives/mixing.py) and the objectives' options that use
it: Mixed Barlow Twins (barlow_twins mix_weight) and BYOL-A's mixup and post-norm (byol, audio)."""
from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from selfsup.trainers.objectives import make_objective
from selfsup.trainers.objectives.barlow_twins import barlow_twins_loss, batch_standardize, cross_correlation
from selfsup.trainers.objectives.barlow_twins import mixup_regularizer
from selfsup.trainers.objectives.mixing import (StepSeeds, background_mixup, batch_post_norm, draw_mixup,
                                                log_mixup_exp)

CNN = {"backbone": "convnet_small", "backbone_args": {"in_channels": 1, "width": 8}}
BT: dict[str, Any] = {**CNN, "proj_dim": 16, "proj_hidden": 16, "lambd": 0.05}
AUDIO: dict[str, Any] = {"backbone": "audio_cnn_small", "backbone_args": {"n_mels": 16, "width": 4},
                         "proj_dim": 8, "proj_hidden": 16, "pred_hidden": 16}


def build(name: str, modality: str, **args: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return make_objective(name, modality=modality, **args)


def views(shape: tuple[int, ...], seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return {"view1": base + 0.1 * torch.randn(shape, generator=g),
            "view2": base.roll(1, dims=-1) + 0.1 * torch.randn(shape, generator=g)}


def c(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cross-correlation Σ_n a[n, i]·b[n, j] / N written as loops."""
    n, d = a.shape
    return torch.tensor([[sum(float(a[k, i] * b[k, j]) for k in range(n)) / n for j in range(d)] for i in range(d)],
                        dtype=torch.float64)


def test_mixup_regularizer_equals_the_papers_equation() -> None:
    g = torch.Generator().manual_seed(0)
    zm, za, zb = (torch.randn(6, 3, generator=g, dtype=torch.float64) for _ in range(3))
    lam, perm = 0.3, torch.tensor([2, 0, 1, 5, 3, 4])
    shuffled = zb[perm]
    want = ((c(zm, za) - lam * c(za, za) - (1 - lam) * c(shuffled, za)).square().sum()
            + (c(zm, zb) - lam * c(za, zb) - (1 - lam) * c(shuffled, zb)).square().sum())
    torch.testing.assert_close(mixup_regularizer(zm, za, zb, lam, perm), want)
    # Embeddings that mix exactly as the inputs do meet the prediction: the term vanishes.
    exact = lam * za + (1 - lam) * shuffled
    assert mixup_regularizer(exact, za, zb, lam, perm).item() == pytest.approx(0.0, abs=1e-12)


def test_mix_weight_zero_is_plain_barlow_twins() -> None:
    b = views((8, 1, 28, 28))
    plain, off = build("barlow_twins", "image", **BT), build("barlow_twins", "image", **BT, mix_weight=0.0)
    assert list(off.state_dict()) == list(plain.state_dict())  # no mixing state: old checkpoints load
    loss = off(b).loss
    assert loss.equal(plain(b).loss)
    with torch.no_grad():
        z = plain.projector(plain.backbone(torch.cat([b["view1"], b["view2"]])))
    assert loss.equal(barlow_twins_loss(cross_correlation(z[:8], z[8:]), 0.05))


def test_mixed_barlow_twins_adds_the_weighted_regularizer_with_the_seeded_draw() -> None:
    b = views((8, 1, 28, 28))
    obj = build("barlow_twins", "image", **BT, mix_weight=2.0, seed=7)
    obj.after_step(3, 10)
    lam, perm = draw_mixup(seeds_at(7, 3), 8)  # what an objective seeded 7 draws after step 3
    with torch.no_grad():
        z = obj.projector(obj.backbone(torch.cat([b["view1"], b["view2"]])))
        zm = obj.projector(obj.backbone(lam * b["view1"] + (1 - lam) * b["view2"][perm]))
    s1, s2, sm = batch_standardize(z[:8]), batch_standardize(z[8:]), batch_standardize(zm)
    want = barlow_twins_loss(cross_correlation(z[:8], z[8:]), 0.05) + 2.0 * 0.05 * mixup_regularizer(sm, s1, s2, lam, perm)
    out = obj(b)
    assert out.metrics["mix_lambda"] == lam and 0 <= lam <= 1
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    for n, p in obj.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


def seeds_at(seed: int, step: int) -> torch.Generator:
    s = StepSeeds(seed)
    s.after_step(step)
    return s.generator("mixed_barlow_twins")


def test_step_seeds_are_a_function_of_seed_step_and_call_and_resume_from_the_state_dict() -> None:
    def draw(s: StepSeeds) -> tuple[float, list[int]]:
        lam, perm = draw_mixup(s.generator("t"), 10)
        return lam, perm.tolist()

    a, b = StepSeeds(1), StepSeeds(1)
    assert draw(a) == draw(b)
    assert draw(a) != draw(StepSeeds(1))  # the second call of a step draws afresh (gradient accumulation)
    assert draw(StepSeeds(2)) != draw(StepSeeds(1))
    a.after_step(5)
    at5 = draw(a)
    assert at5 != draw(StepSeeds(1))
    obj = build("barlow_twins", "image", **BT, mix_weight=1.0, seed=1)
    obj.after_step(5, 10)
    state = obj.state_dict()
    assert state["mix_seeds._extra_state"] == {"seed": 1, "step": 5}
    resumed = build("barlow_twins", "image", **BT, mix_weight=1.0, seed=1)
    resumed.load_state_dict(state)
    assert draw(resumed.mix_seeds) == at5


def test_log_mixup_exp_is_byola_formula() -> None:
    g = torch.Generator().manual_seed(0)
    x, bg = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    alpha = torch.tensor([0.0, 0.25, 0.4])
    got = log_mixup_exp(x, bg, alpha)
    for i, a in enumerate(alpha.tolist()):
        want = torch.log((1 - a) * torch.exp(x[i]) + a * torch.exp(bg[i]) + torch.finfo(torch.float32).eps)
        torch.testing.assert_close(got[i], want)
    torch.testing.assert_close(got[0], x[0], rtol=1e-5, atol=1e-5)


def test_background_mixup_mixes_each_row_with_another_row_by_at_most_ratio() -> None:
    levels = torch.arange(6, dtype=torch.float32)  # row i is the constant log-level i
    x = levels.view(6, 1, 1).expand(6, 4, 5).contiguous()
    out = background_mixup(x, torch.Generator().manual_seed(3), 0.4)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, background_mixup(x, torch.Generator().manual_seed(3), 0.4))
    assert not out.equal(background_mixup(x, torch.Generator().manual_seed(4), 0.4))
    for i in range(6):
        m = float(out[i, 0, 0])
        assert torch.allclose(out[i], torch.full((4, 5), m))
        # e^m = (1 - α)e^i + α e^j for some other row j and α in [0, 0.4]
        shares = [(math.exp(m) - math.exp(i)) / (math.exp(j) - math.exp(i)) for j in range(6) if j != i]
        assert any(-1e-4 <= a <= 0.4 + 1e-4 for a in shares), (i, m, shares)
    with pytest.raises(ValueError, match="batch_size >= 2"):
        background_mixup(x[:1], torch.Generator().manual_seed(0), 0.4)


def test_batch_post_norm_standardizes_the_whole_batch() -> None:
    x = 3 + 2 * torch.randn(6, 4, 5, generator=torch.Generator().manual_seed(0))
    out = batch_post_norm(x)
    torch.testing.assert_close(out, (x - x.mean()) / x.std())
    assert abs(out.mean().item()) < 1e-5 and out.std().item() == pytest.approx(1.0, abs=1e-5)


def test_byola_objective_trains_with_seeded_mixup_and_post_norm() -> None:
    b = views((6, 16, 32))
    plain = build("byol", "audio", **AUDIO)
    assert not any("mix_seeds" in k for k in plain.state_dict())
    a1 = build("byol", "audio", **AUDIO, mixup_ratio=0.4, post_norm=True, seed=3)
    a2 = build("byol", "audio", **AUDIO, mixup_ratio=0.4, post_norm=True, seed=3)
    other = build("byol", "audio", **AUDIO, mixup_ratio=0.4, post_norm=True, seed=4)
    out = a1(b)
    assert out.loss.equal(a2(b).loss) and not out.loss.equal(other(b).loss)
    assert not out.loss.equal(plain(b).loss)
    out.loss.backward()
    for n, p in a1.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
    fresh_plain = build("byol", "audio", **AUDIO).eval()
    fresh_byola = build("byol", "audio", **AUDIO, mixup_ratio=0.4, post_norm=True, seed=3).eval()
    assert fresh_byola(b).loss.equal(fresh_plain(b).loss)  # evaluation skips the batch steps


@pytest.mark.parametrize("name,modality,args,match", [
    ("barlow_twins", "image", {**BT, "mix_weight": -1.0}, "barlow_twins mix_weight=-1.0"),
    ("byol", "audio", {**AUDIO, "mixup_ratio": 1.5}, "byol mixup_ratio=1.5"),
    ("byol", "image", {**CNN, "mixup_ratio": 0.4}, "byol mixup_ratio/post_norm.*'image'"),
    ("byol", "image", {**CNN, "post_norm": True}, "byol mixup_ratio/post_norm.*'image'"),
])
def test_bad_mixing_arguments_raise_naming_the_argument(name: str, modality: str, args: dict[str, Any],
                                                        match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build(name, modality, **args)
