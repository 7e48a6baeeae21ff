"""Image-family objectives through the registry: loss, gradients, learning, EMA, masks, encoders."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from selfsup.trainers.backbones import make_backbone
from selfsup.trainers.objectives import OBJECTIVES, make_objective
from selfsup.trainers.objectives.barlow_twins import barlow_twins_loss, cross_correlation
from selfsup.trainers.objectives.byol import cosine_tau
from selfsup.trainers.objectives.corinfomax import invariance_loss, logdet_loss, running_moments
from selfsup.trainers.objectives.simclr import nt_xent, nt_xent_distributed
from selfsup.trainers.objectives.swav import distributed_sinkhorn, gather_rows, rank_slice
from tests.conftest import random_mask

CNN = {"backbone": "convnet_small", "backbone_args": {"in_channels": 1, "width": 8}}
VIT = {"backbone": "vit_micro", "backbone_args": {"in_channels": 1, "img_size": 28, "patch_size": 4}}
DECODER = {"decoder_dim": 64, "decoder_depth": 1, "decoder_heads": 4}
CONFIGS: dict[str, dict[str, Any]] = {
    "simclr": {**CNN, "proj_dim": 32},
    "byol": {**CNN, "proj_dim": 32, "proj_hidden": 64, "pred_hidden": 64, "tau_base": 0.99},
    "barlow_twins": {**CNN, "proj_dim": 64, "proj_hidden": 64},
    "mae": {**VIT, **DECODER, "mask_ratio": 0.75},
}
LRS = {"simclr": 3e-3, "byol": 3e-3, "barlow_twins": 3e-3, "mae": 1e-3}
STEPS = {"simclr": 20, "byol": 20, "barlow_twins": 20, "mae": 10}


def image_batch(b: int = 16) -> dict[str, torch.Tensor]:
    """Two noisy, shifted views of smooth random 28×28 images, a single view, and a 36/49 mask."""
    g = torch.Generator().manual_seed(1)
    base = torch.nn.functional.interpolate(torch.randn(b, 1, 7, 7, generator=g), size=28, mode="bilinear")
    view1 = base + 0.1 * torch.randn(base.shape, generator=g)
    view2 = torch.roll(base, shifts=2, dims=3) + 0.1 * torch.randn(base.shape, generator=g)
    return {"view1": view1, "view2": view2, "image": base, "mask": random_mask(b, 49, 36)}


def build(name: str, modality: str = "image", **overrides: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    return make_objective(name, modality=modality, **{**CONFIGS[name], **overrides})


def train(obj: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int, lr: float) -> list[float]:
    """Losses of `steps` AdamW steps on one fixed batch, calling after_step like the loop."""
    opt = torch.optim.AdamW(obj.param_groups(0.01), lr=lr)
    losses = []
    for step in range(steps):
        out = obj(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        obj.after_step(step + 1, steps)
        losses.append(out.loss.item())
    return losses


def assert_falls(losses: list[float], factor: float = 0.8) -> None:
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert all(math.isfinite(v) for v in losses), losses
    assert last < factor * first, f"loss did not fall: {first:.4f} → {last:.4f} ({losses})"


@pytest.mark.parametrize("name", ["simclr", "byol", "barlow_twins", "mae"])
def test_finite_loss_and_every_trainable_parameter_gets_a_gradient(name: str) -> None:
    obj = build(name)
    batch = image_batch()
    out = obj(batch)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.embedding is not None and not out.embedding.requires_grad and out.embedding.shape[0] == 16
    out.loss.backward()
    trainable = [(n, p) for n, p in obj.named_parameters() if p.requires_grad]
    assert trainable
    for n, p in trainable:
        assert p.grad is not None, f"{name}: {n} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {n} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: {n} has an all-zero gradient"
    frozen = [(n, p) for n, p in obj.named_parameters() if not p.requires_grad]
    assert bool(frozen) == (name == "byol")  # only BYOL's EMA target is frozen
    assert all(n.startswith("target_") and p.grad is None for n, p in frozen)
    groups = obj.param_groups(0.05)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for _, p in trainable)  # each trainable param once
    assert set(obj.needs) <= set(batch)


@pytest.mark.parametrize("name", ["simclr", "byol", "barlow_twins", "mae"])
def test_loss_falls_on_a_fixed_batch(name: str) -> None:
    assert_falls(train(build(name), image_batch(), STEPS[name], LRS[name]))


def test_mae_fills_hidden_patches_from_visible_ones() -> None:
    """Per-image constant brightness: only the visible tokens can tell the decoder a hidden patch's value."""
    g = torch.Generator().manual_seed(1)
    level = torch.randn(8, 1, 1, 1, generator=g)
    batch = {"image": level + 0.05 * torch.randn(8, 1, 28, 28, generator=g), "mask": random_mask(8, 49, 36)}
    blind = (level - level.mean()).square().mean().item()  # best MSE of a predictor that ignores the visible tokens
    losses = train(build("mae", norm_pix_loss=False), batch, 24, 1e-3)
    assert sum(losses[-3:]) / 3 < 0.6 * blind, (blind, losses)


def reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """SimCLR eq. (1): l(i,j) = -log exp(s_ij/t) / Σ_{k≠i} exp(s_ik/t), averaged over all 2N ordered pairs."""
    z = [v for pair in zip(z1, z2) for v in pair]  # 2k-1, 2k are the two views of sample k
    n2 = len(z)

    def sim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b) / (a.norm() * b.norm())

    def loss(i: int, j: int) -> torch.Tensor:
        denom = sum(torch.exp(sim(z[i], z[k]) / t) for k in range(n2) if k != i)
        return -torch.log(torch.exp(sim(z[i], z[j]) / t) / denom)

    return sum(loss(2 * k, 2 * k + 1) + loss(2 * k + 1, 2 * k) for k in range(n2 // 2)) / n2


def test_nt_xent_equals_the_papers_formula() -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    for t in (0.1, 0.5):
        got = nt_xent(z1.float(), z2.float(), t)
        torch.testing.assert_close(got.double(), reference_nt_xent(z1, z2, t), rtol=1e-5, atol=1e-5)
    assert nt_xent(z1.float(), z1.float(), 0.1) < nt_xent(z1.float(), z2.float(), 0.1)  # aligned views score lower


def corinfomax_moments(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CorInfoMax's running mean and covariance after one batch, from 0 and I."""
    d = z.shape[1]
    mu, r = running_moments(z, torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64), 0.1, 0.2)
    return mu.detach(), r.detach()


def pair_loss(name: str, a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """The loss `name` of two embedding batches (the local rows under torch.distributed)."""
    if name == "simclr":
        return nt_xent_distributed(a1, a2, 0.2) if dist.is_initialized() else nt_xent(a1, a2, 0.2)
    if name == "barlow":
        return barlow_twins_loss(cross_correlation(a1, a2), 0.05)
    d = a1.shape[1]
    _, r1 = running_moments(a1, torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64), 0.1, 0.2)
    return (logdet_loss(r1, 1e-8) + 10 * invariance_loss(a1, a2)).float()


def distributed_worker(rank: int, world: int, init_file: str, z1: torch.Tensor, z2: torch.Tensor, out: str) -> None:
    """One gloo rank: the losses and input gradients of its shard of the batch."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    b = z1.shape[0] // world
    results = {}
    for name in ("simclr", "barlow", "corinfomax"):
        a1 = z1[rank * b:(rank + 1) * b].clone().requires_grad_()
        a2 = z2[rank * b:(rank + 1) * b].clone().requires_grad_()
        loss = pair_loss(name, a1, a2)
        loss.backward()
        results[name] = (loss.detach(), a1.grad, a2.grad)
    mine = z1[rank * b:(rank + 1) * b]
    results["corinfomax_moments"] = corinfomax_moments(mine)
    # SwAV: codes of this rank's rows; the queue's gather and share
    results["swav"] = (distributed_sinkhorn(mine @ z2.T, 0.05, 3), gather_rows(mine), rank_slice(z2))
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_rank_losses_and_gradients_equal_the_full_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(8, 6), torch.randn(8, 6)
    mp.spawn(distributed_worker, args=(2, str(tmp_path / "init"), z1, z2, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    full = {}
    for name in ("simclr", "barlow", "corinfomax"):
        a1, a2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        loss = pair_loss(name, a1, a2)
        loss.backward()
        full[name] = (loss.detach(), a1.grad, a2.grad)
    # SimCLR: each rank averages its own anchors; Barlow Twins, CorInfoMax: every rank holds the global
    # loss, and CorInfoMax's running estimates are the full batch's on every rank.
    # SwAV's Sinkhorn sums over ranks: the ranks' codes are the full batch's rows; the queue's helpers
    # gather every rank's rows in rank order and hand each rank its half of a shared queue.
    torch.testing.assert_close(torch.cat([ranks[r]["swav"][0] for r in range(2)]),
                               distributed_sinkhorn(z1 @ z2.T, 0.05, 3))
    for r in range(2):
        torch.testing.assert_close(ranks[r]["swav"][1], z1)
        torch.testing.assert_close(ranks[r]["swav"][2], z2[r * 4:(r + 1) * 4])
    rank_loss = (ranks[0]["simclr"][0] + ranks[1]["simclr"][0]) / 2
    torch.testing.assert_close(rank_loss, full["simclr"][0])
    for r in range(2):
        for name in ("barlow", "corinfomax"):
            torch.testing.assert_close(ranks[r][name][0], full[name][0])
        for got, want in zip(ranks[r]["corinfomax_moments"], corinfomax_moments(z1)):
            torch.testing.assert_close(got, want)
    # Differentiable collectives give each rank d(Σ_ranks loss)/d(local rows) = world × the full gradient;
    # DDP's gradient averaging divides that by the world size again.
    for name in ("simclr", "barlow", "corinfomax"):
        for v in (1, 2):
            got = torch.cat([ranks[0][name][v], ranks[1][name][v]]) / 2
            torch.testing.assert_close(got, full[name][v], rtol=1e-4, atol=1e-6)


def test_byol_target_follows_the_cosine_schedule_and_lives_in_the_state_dict() -> None:
    assert cosine_tau(0.996, 0, 100) == pytest.approx(0.996)
    assert cosine_tau(0.996, 50, 100) == pytest.approx(0.998)
    assert cosine_tau(0.996, 100, 100) == pytest.approx(1.0)
    obj = build("byol", tau_base=0.9)
    assert any(k.startswith("target_backbone.") for k in obj.state_dict())
    assert any(k.startswith("target_projector.") for k in obj.state_dict())
    online, target = obj.backbone.features[0][0].weight, obj.target_backbone.features[0][0].weight
    assert torch.equal(online, target)
    train(obj, image_batch(), 1, 1e-2)  # one step moves the online net, then after_step(1, 1)
    assert obj.tau == pytest.approx(1.0)
    before = target.clone()
    obj.after_step(0, 10)  # tau = 0.9: target ← 0.9·target + 0.1·online
    assert obj.tau == pytest.approx(0.9)
    torch.testing.assert_close(target, 0.9 * before + 0.1 * online)
    assert not torch.equal(target, before)
    obj.after_step(5, 10)
    assert obj.tau == pytest.approx(0.95)


@pytest.mark.parametrize("name", ["simclr", "byol", "barlow_twins", "mae"])
def test_encoder_reloads_from_its_spec(name: str) -> None:
    obj = build(name)
    train(obj, image_batch(), 2, LRS[name])  # move weights and BatchNorm statistics off their init
    spec = obj.encoder_spec()
    enc = obj.encoder().eval()
    fresh = make_backbone(spec["backbone"], **spec["backbone_args"]).eval()
    x = image_batch()["image"][:4]
    with torch.no_grad():
        assert not torch.allclose(fresh(x), enc(x))
        fresh.load_state_dict(enc.state_dict())
        assert torch.equal(fresh(x), enc(x))
    assert fresh(x).shape == (4, fresh.out_dim)


def test_mask_spec_per_modality() -> None:
    assert build("simclr").mask_spec() is None and build("byol").mask_spec() is None
    assert build("barlow_twins").mask_spec() is None
    assert build("mae").mask_spec() == {"kind": "random", "ratio": 0.75, "geometry": {"patch": 4}}
    video_args = {"in_channels": 3, "frames": 4, "img_size": 16, "tubelet": [2, 4, 4]}
    video = build("mae", "video", mask_ratio=None, backbone_args=video_args)
    assert video.mask_spec() == {"kind": "tube", "ratio": 0.9, "geometry": {"tubelet": [2, 4, 4]}}
    assert video.needs == ("video", "mask")
    audio = build("mae", "audio", mask_ratio=None, backbone_args={"n_mels": 16, "frames": 32, "patch_size": [4, 4]})
    assert audio.mask_spec() == {"kind": "random", "ratio": 0.8, "geometry": {"patch": [4, 4]}}
    assert audio.needs == ("spec", "mask")
    assert audio.encoder_spec()["backbone_args"]["modality"] == "audio"


def test_mae_on_video_tubelets_trains() -> None:
    args = {"in_channels": 3, "frames": 4, "img_size": 16, "tubelet": [2, 4, 4]}  # grid 2×4×4
    obj = build("mae", "video", mask_ratio=0.75, backbone_args=args)
    spatial = random_mask(4, 16, 12, seed=3)  # tube mask: the same 12 of 16 places in both time slots
    g = torch.Generator().manual_seed(2)
    batch = {"video": torch.randn(4, 3, 4, 16, 16, generator=g), "mask": spatial.repeat(1, 2)}
    assert_falls(train(obj, batch, 15, 1e-3))


def test_mae_on_spectrogram_patches_trains() -> None:
    obj = build("mae", "audio", mask_ratio=0.8, backbone_args={"n_mels": 16, "frames": 32, "patch_size": [4, 4]})
    g = torch.Generator().manual_seed(2)
    batch = {"spec": torch.randn(4, 16, 32, generator=g), "mask": random_mask(4, 32, 25, seed=4)}
    assert_falls(train(obj, batch, 15, 1e-3))


MAE_INPUTS = {  # modality → (backbone args, input shape [B, ...])
    "image": (VIT["backbone_args"], (4, 1, 28, 28)),
    "video": ({"in_channels": 3, "frames": 4, "img_size": 16, "tubelet": [2, 4, 4]}, (4, 3, 4, 16, 16)),
    "audio": ({"n_mels": 16, "frames": 32, "patch_size": [4, 4]}, (4, 16, 32)),
}


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_mae_loss_ignores_hidden_patches_in_the_encoder(modality: str) -> None:
    """Changing hidden patches moves the loss (their targets) but not the encoder's embedding."""
    args, shape = MAE_INPUTS[modality]
    obj = build("mae", modality, backbone_args=args).eval()
    tok, n, field = obj.backbone.tokenizer, obj.backbone.num_tokens, obj.needs[0]
    numel = math.prod(shape[1:])
    elements = tok.patchify(torch.arange(numel, dtype=torch.float64).reshape(1, *shape[1:]))[0].long()  # [N, P]
    owner = torch.empty(numel, dtype=torch.long)
    owner[elements.flatten()] = torch.arange(n).repeat_interleave(tok.patch_dim)  # token of each input element
    mask = random_mask(shape[0], n, 3 * n // 4, seed=5)
    hidden = mask[:, owner].reshape(shape)  # [B, ...] True on the elements of hidden tokens
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g)
    noise = 3 * torch.randn(shape, generator=g)
    with torch.no_grad():
        a = obj({field: x, "mask": mask})
        b = obj({field: torch.where(hidden, noise, x), "mask": mask})
        assert torch.equal(a.embedding, b.embedding)
        assert not torch.isclose(a.loss, b.loss)
        visible_changed = obj({field: torch.where(~hidden, noise, x), "mask": mask})
        assert not torch.allclose(visible_changed.embedding, a.embedding)


def test_contrastive_objectives_take_video_and_audio_views() -> None:
    torch.manual_seed(0)
    video_args = {"modality": "video", "in_channels": 3, "frames": 4, "img_size": 16, "tubelet": [2, 8, 8]}
    audio_args = {"modality": "audio", "n_mels": 16, "frames": 32, "patch_size": [8, 8]}
    video = {"backbone": "vit_micro", "backbone_args": video_args}
    audio = {"backbone": "vit_micro", "backbone_args": audio_args}
    for name in ("simclr", "byol", "barlow_twins"):
        for modality, spec, shape in (("video", video, (4, 3, 4, 16, 16)), ("audio", audio, (4, 16, 32))):
            obj = build(name, modality, **spec)
            out = obj({"view1": torch.randn(shape), "view2": torch.randn(shape)})
            assert torch.isfinite(out.loss) and out.embedding.shape == (4, 128), (name, modality)


def test_unknown_names_and_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match=r"unknown objective 'simsiam'.*barlow_twins, byol, corinfomax, exemplar, mae, s4l, simclr, swav, temporal_order, wav2vec2"):
        make_objective("simsiam", modality="image", backbone="convnet_small", backbone_args={})
    for name in ("simclr", "byol", "barlow_twins", "mae"):
        assert name in OBJECTIVES
        with pytest.raises(ValueError, match=r"unknown backbone 'convnet_huge'.*convnet_small"):
            make_objective(name, modality="image", backbone="convnet_huge", backbone_args={})
    with pytest.raises(ValueError, match=r"lacks \['view2'\]"):
        build("simclr")({"view1": torch.randn(2, 1, 28, 28)})
    with pytest.raises(ValueError, match="token backbone"):
        make_objective("mae", modality="image", backbone="convnet_small", backbone_args={})
    with pytest.raises(ValueError, match="same count"):
        batch = image_batch(2)
        batch["mask"][0, ~batch["mask"][0]] = True
        build("mae")(batch)
