"""Exemplar-CNN and S4L: their losses against explicit formulas of the papers, the memory bank's update,
and both objectives through the registry (gradients, learning, unlabeled batches, bad ids)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from selfsup.trainers.objectives import make_objective
from selfsup.trainers.objectives.exemplar import (estimate_z, momentum_update, nce_loss, resolve_head,
                                                  surrogate_cross_entropy)
from selfsup.trainers.objectives.s4l import labeled_cross_entropy

CNN = {"modality": "image", "backbone": "convnet_small", "backbone_args": {"in_channels": 1, "width": 8}}


def batch(b: int = 8, ids: list[int] | None = None, labels: list[int] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    base = F.interpolate(torch.randn(b, 1, 7, 7, generator=g), size=28, mode="bilinear")
    out = {"view1": base + 0.1 * torch.randn(base.shape, generator=g),
           "view2": torch.roll(base, 2, dims=3) + 0.1 * torch.randn(base.shape, generator=g),
           "sample_id": torch.tensor(ids if ids is not None else list(range(b)))}
    if labels is not None:
        out["label"] = torch.tensor(labels)
    return out


def explicit_ce(logits: torch.Tensor, targets: list[int]) -> float:
    """Mean over rows with target ≥ 0 of -log softmax(logits)[target], by loops; 0 for none."""
    terms = []
    for row, t in zip(logits.tolist(), targets):
        if t >= 0:
            terms.append(-(row[t] - math.log(sum(math.exp(v) for v in row))))
    return sum(terms) / len(terms) if terms else 0.0


def test_surrogate_and_labeled_cross_entropy_match_the_explicit_formula_and_ignore_minus_one() -> None:
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    for targets in ([0, 6, 3, -1, 2], [-1] * 5, [4, 4, 4, 4, 4]):
        for fn in (surrogate_cross_entropy, labeled_cross_entropy):
            got = fn(logits, torch.tensor(targets))
            assert torch.isfinite(got) and got.item() == pytest.approx(explicit_ce(logits, targets), abs=1e-5)


def test_nce_loss_and_z_match_wu_et_al_equations() -> None:
    g = torch.Generator().manual_seed(0)
    n, d, m, tau = 6, 4, 3, 0.5
    bank = F.normalize(torch.randn(n, d, generator=g), dim=1)
    f = F.normalize(torch.randn(3, d, generator=g), dim=1)
    ids, noise = torch.tensor([1, 4, -1]), torch.tensor([[0, 2, 5], [1, 3, 3], [0, 0, 1]])
    z = 2.5
    expected, kept = 0.0, 0
    for b in range(3):
        if ids[b] < 0:
            continue
        p = lambda j: math.exp(float(f[b] @ bank[j]) / tau) / z  # noqa: E731 - P(j|f) of the paper
        pn = 1 / n
        term = -math.log(p(int(ids[b])) / (p(int(ids[b])) + m * pn))
        term -= sum(math.log(m * pn / (p(int(j)) + m * pn)) for j in noise[b])
        expected, kept = expected + term, kept + 1
    got = nce_loss(f, bank, ids, noise, tau, torch.tensor(z))
    assert got.item() == pytest.approx(expected / kept, rel=1e-5)
    z_ref = n * sum(math.exp(float(f[b] @ bank[int(j)]) / tau) for b in range(3) for j in noise[b]) / (3 * m)
    assert estimate_z(f, bank, noise, tau).item() == pytest.approx(z_ref, rel=1e-5)


def test_memory_bank_momentum_update_moves_only_the_rows_of_real_ids() -> None:
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(5, 3, generator=g), dim=1)
    before = bank.clone()
    feats = F.normalize(torch.randn(3, 3, generator=g), dim=1)
    momentum_update(bank, torch.tensor([2, -1, 0]), feats, 0.5)
    for i, row in ((2, 0), (0, 2)):
        mixed = 0.5 * before[i] + 0.5 * feats[row]
        assert torch.allclose(bank[i], mixed / mixed.norm(), atol=1e-6)
    assert torch.equal(bank[[1, 3, 4]], before[[1, 3, 4]])


def test_head_auto_is_parametric_up_to_the_threshold_then_the_memory_bank() -> None:
    assert resolve_head("auto", 100, 100) == "parametric" and resolve_head("auto", 101, 100) == "memory_bank"
    with pytest.raises(ValueError, match="valid: auto, parametric, memory_bank"):
        resolve_head("softmax", 10, 100)


@pytest.mark.parametrize("head", ["parametric", "memory_bank"])
def test_exemplar_learns_with_gradients_everywhere_and_the_bank_follows(head: str) -> None:
    torch.manual_seed(0)
    obj = make_objective("exemplar", **CNN, num_classes=8, head=head, proj_dim=16, num_negatives=4)
    data = batch(8)
    out = obj(data)
    out.loss.backward()
    for name, p in obj.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    if head == "memory_bank":
        assert obj.z.item() > 0 and torch.allclose(obj.bank.norm(dim=1), torch.ones(8), atol=1e-5)
    opt = torch.optim.AdamW(obj.param_groups(0.0), lr=3e-3)

    def measured() -> float:  # the same noise samples each time (NCE draws them from torch's RNG)
        torch.manual_seed(7)
        with torch.no_grad():
            return obj(data).loss.item()

    first = measured()
    for _ in range(8):
        loss = obj(data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = measured()
    assert math.isfinite(last) and last < 0.9 * first, (first, last)


def test_exemplar_ignores_padding_and_refuses_ids_past_num_classes() -> None:
    torch.manual_seed(0)
    obj = make_objective("exemplar", **CNN, num_classes=8, head="memory_bank", proj_dim=16, num_negatives=4)
    before = obj.bank.clone()
    obj(batch(4, ids=[-1, -1, -1, 5]))
    assert torch.equal(obj.bank[:5], before[:5]) and not torch.equal(obj.bank[5], before[5])
    assert obj(batch(4, ids=[-1] * 4)).loss.item() == 0.0  # all padding: 0, not NaN
    fresh = make_objective("exemplar", **CNN, num_classes=8, proj_dim=16)
    with pytest.raises(ValueError, match="sample_id 8 ≥ num_classes=8"):
        fresh(batch(4, ids=[0, 1, 8, 2]))
    with pytest.raises(ValueError, match="num_classes=None"):
        make_objective("exemplar", **CNN)


def test_s4l_loss_is_the_base_loss_plus_weighted_cross_entropy_on_labeled_rows_only() -> None:
    torch.manual_seed(0)
    obj = make_objective("s4l", **CNN, num_labels=4, base="simclr", base_args={"proj_dim": 16},
                         supervised_weight=0.7)
    labels = [2, -1, 0, -1, 3, -1, -1, 1]
    data = batch(8, labels=labels)
    out = obj(data)
    ssl = obj.base(data).loss  # batch-statistics BatchNorm: the same forward gives the same value
    logits = obj.head(obj.base.encoder()(data["view1"]))
    assert out.loss.item() == pytest.approx(ssl.item() + 0.7 * explicit_ce(logits.detach(), labels), rel=1e-5)
    assert out.metrics["labeled_frac"] == 0.5
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.head.parameters())
    groups = obj.param_groups(0.1)
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in obj.parameters())


def test_s4l_without_labels_is_the_base_loss_not_nan_and_bad_labels_are_named() -> None:
    torch.manual_seed(0)
    obj = make_objective("s4l", **CNN, num_labels=4, base_args={"proj_dim": 16})
    for data in (batch(8), batch(8, labels=[-1] * 8)):  # no labeled source / an all-unlabeled batch
        out = obj(data)
        assert torch.isfinite(out.loss) and out.loss.item() == pytest.approx(obj.base(data).loss.item(), rel=1e-5)
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in obj.head.parameters())
    fresh = make_objective("s4l", **CNN, num_labels=4, base_args={"proj_dim": 16})
    with pytest.raises(ValueError, match="label 4 ≥ num_labels=4"):
        fresh(batch(4, labels=[0, 4, -1, 1]))
    assert fresh.encoder_spec() == {"backbone": "convnet_small", "backbone_args": {"in_channels": 1, "width": 8}}
