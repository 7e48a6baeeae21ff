"""Backbones through the registry: shapes, token order shared with the masks, masking, throughput."""
from __future__ import annotations

import time

import pytest
import torch

from selfsup.trainers.backbones import BACKBONES, make_backbone
from selfsup.trainers.backbones.tokenizers import sincos_pos_embed
from tests.conftest import random_mask


def test_registry_holds_every_backbone_and_unknown_names_list_them() -> None:
    names = ["convnet_small", "resnet18", "resnet50", "resnet18_narrow"]
    names += ["vit_micro", "vit_tiny", "vit_small", "vit_base"]
    for name in names:
        assert name in BACKBONES
    with pytest.raises(ValueError, match=r"unknown backbone 'vit_huge'.*convnet_small.*vit_micro"):
        make_backbone("vit_huge")


def test_an_architecture_over_the_bounds_is_refused_before_it_is_allocated() -> None:
    """A config's backbone_args go through the same check as a checkpoint's; the check draws no random numbers."""
    with pytest.raises(ValueError, match=r"^backbone 'convnet_small' with backbone_args \{'width': 32768\} would "
                                         r"hold 405,876,670,468 parameters and buffers"):
        make_backbone("convnet_small", width=32768)
    with pytest.raises(ValueError, match=r"backbone_args.tubelet\[0\]=100000: .* at most 65536"):
        make_backbone("vit_micro", modality="video", tubelet=[100_000, 16, 16])
    torch.manual_seed(0)
    checked = make_backbone("vit_micro", img_size=32, patch_size=8)
    torch.manual_seed(0)
    direct = BACKBONES.get("vit_micro")(img_size=32, patch_size=8)
    assert all(torch.equal(a, b) for a, b in zip(checked.state_dict().values(), direct.state_dict().values()))


def test_cnn_and_resnet_shapes() -> None:
    torch.manual_seed(0)
    x1 = torch.randn(2, 1, 28, 28)
    cases = [
        ("convnet_small", {"in_channels": 1, "width": 8}, x1, 64),
        ("convnet_small", {"in_channels": 1, "width": 8, "out_dim": 10}, x1, 10),
        ("resnet18_narrow", {"in_channels": 1, "width": 8}, x1, 64),
        ("resnet18", {"in_channels": 1, "small_input": True}, x1, 512),
        ("resnet18", {}, torch.randn(2, 3, 64, 64), 512),
        ("resnet50", {}, torch.randn(2, 3, 64, 64), 2048),
    ]
    for name, args, x, dim in cases:
        m = make_backbone(name, **args).eval()
        assert m.out_dim == dim, name
        with torch.no_grad():
            assert m(x).shape == (2, dim), (name, args)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        make_backbone("convnet_small")(torch.randn(2, 28, 28))


def test_convnet_small_first_stride_keeps_resolution() -> None:
    x = torch.randn(2, 1, 28, 28)
    for stride, side in ((2, 2), (1, 4)):  # 28 px ends at 2 × 2 with four stride-2 stages, 4 × 4 with three
        m = make_backbone("convnet_small", in_channels=1, width=8, first_stride=stride).eval()
        with torch.no_grad():
            assert m.features(x).shape == (2, 64, side, side) and m(x).shape == (2, 64)
    with pytest.raises(ValueError, match="first_stride=3; give 1 or 2"):
        make_backbone("convnet_small", first_stride=3)


def test_convnet_small_pools() -> None:
    x = torch.randn(3, 1, 28, 28)
    for pool in ("mean", "max", "cat", "grid"):
        m = make_backbone("convnet_small", in_channels=1, width=8, pool=pool).eval()
        with torch.no_grad():
            h, out = m.features(x), m(x)
        want = {"mean": h.mean(dim=(2, 3)), "max": h.amax(dim=(2, 3)),
                "cat": torch.cat([h.amax(dim=(2, 3)), h.mean(dim=(2, 3))], 1), "grid": h.flatten(1)}[pool]
        assert h.shape[2:] == (2, 2) and m.out_dim == out.shape[1] == {"cat": 128, "grid": 256}.get(pool, 64)
        torch.testing.assert_close(out, want)
    with pytest.raises(ValueError, match="pool='sum' unknown; valid: mean, max, cat, grid"):
        make_backbone("convnet_small", pool="sum")


def test_vit_sizes_and_standard_vit_base() -> None:
    dims = {"vit_micro": 128, "vit_tiny": 192, "vit_small": 384, "vit_base": 768}
    for name, dim in dims.items():
        m = make_backbone(name, in_channels=1, img_size=16, patch_size=8)
        assert m.out_dim == dim and m.num_tokens == 4
    base = make_backbone("vit_base", img_size=224, patch_size=16).eval()
    assert base.num_tokens == 196 and base.grid == (14, 14)
    with torch.no_grad():
        assert base(torch.randn(1, 3, 224, 224)).shape == (1, 768)


def test_vit_per_modality_shapes_and_bad_arguments() -> None:
    video = make_backbone("vit_micro", modality="video", in_channels=3, frames=16, img_size=64, tubelet=[2, 16, 16])
    assert video.grid == (8, 4, 4) and video.num_tokens == 128
    audio = make_backbone("vit_micro", modality="audio", n_mels=16, frames=32, patch_size=[4, 8])
    assert audio.grid == (4, 4)
    with torch.no_grad():
        assert video(torch.randn(2, 3, 16, 64, 64)).shape == (2, 128)
        assert audio(torch.randn(2, 16, 32)).shape == (2, 128)
        with pytest.raises(ValueError, match=r"\[B, F, T\]"):
            audio(torch.randn(2, 16, 48))
    with pytest.raises(ValueError, match="not a positive multiple"):
        make_backbone("vit_micro", img_size=30, patch_size=4)
    with pytest.raises(ValueError, match=r"unknown arguments \['tubelet'\]"):
        make_backbone("vit_micro", modality="image", tubelet=[2, 4, 4])
    with pytest.raises(ValueError, match=r"modality 'text'.*audio, image, video"):
        make_backbone("vit_micro", modality="text")


def index_filled(modality: str) -> tuple[torch.Tensor, dict]:
    """An input whose every patch holds its own row-major grid index, and the backbone args."""
    if modality == "image":  # grid (3, 4), patch 2
        args = {"modality": "image", "in_channels": 2, "img_size": [6, 8], "patch_size": 2}
        idx = torch.arange(12.0).reshape(3, 4).repeat_interleave(2, 0).repeat_interleave(2, 1)
        return idx.expand(1, 2, 6, 8).clone(), args
    if modality == "video":  # grid (2, 2, 3), tubelet [2, 2, 2]
        args = {"modality": "video", "in_channels": 3, "frames": 4, "img_size": [4, 6], "tubelet": [2, 2, 2]}
        idx = torch.arange(12.0).reshape(2, 2, 3)
        idx = idx.repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2)
        return idx.expand(1, 3, 4, 4, 6).clone(), args
    args = {"modality": "audio", "n_mels": 6, "frames": 8, "patch_size": [2, 4]}  # grid (3, 2)
    idx = torch.arange(6.0).reshape(3, 2).repeat_interleave(2, 0).repeat_interleave(4, 1)
    return idx[None].clone(), args


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_tokens_are_row_major_and_match_patchify(modality: str) -> None:
    torch.manual_seed(0)
    x, args = index_filled(modality)
    m = make_backbone("vit_micro", **args)
    tok = m.tokenizer
    patches = tok.patchify(x)  # [1, N, P]
    n = m.num_tokens
    assert patches.shape == (1, n, tok.patch_dim)
    assert torch.equal(patches[0], torch.arange(float(n))[:, None].expand(n, tok.patch_dim))
    # The conv embedding of token k is the linear map of patchify's patch k: same order, same layout.
    x = torch.randn_like(x)
    w = tok.proj.weight
    w = w.permute(0, *range(2, w.ndim), 1).reshape(w.shape[0], -1)  # channels last, like patchify
    expected = tok.patchify(x) @ w.T + tok.proj.bias
    torch.testing.assert_close(tok(x), expected, rtol=1e-4, atol=1e-4)


def test_sincos_pos_embed_is_distinct_per_token() -> None:
    for grid in [(7, 7), (2, 4, 4), (4, 8)]:
        pe = sincos_pos_embed(128, grid)
        assert pe.shape == (int(torch.tensor(grid).prod()), 128)
        assert torch.cdist(pe, pe).add(torch.eye(pe.shape[0]) * 10).min() > 1e-3


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_hidden_patches_never_reach_the_encoder(modality: str) -> None:
    torch.manual_seed(0)
    x, args = index_filled(modality)
    x = torch.randn(3, *x.shape[1:])
    m = make_backbone("vit_micro", **args).eval()
    tok, n = m.tokenizer, m.num_tokens
    mask = random_mask(3, n, n // 2)
    patches = tok.patchify(x)
    noise = torch.randn_like(patches) * 5
    # Rebuild the input from patches by solving for x: patchify is a permutation, so invert it by index.
    positions = tok.patchify(torch.arange(x.numel() // 3, dtype=torch.float64).reshape(x.shape[1:])[None])[0].long()

    def perturbed(which: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(3, -1).clone()
        for b in range(3):
            for k in which[b].nonzero().flatten().tolist():
                flat[b, positions[k]] += noise[b, k]
        return flat.reshape(x.shape)

    with torch.no_grad():
        base = m.encode_visible(x, mask)
        assert base.shape == (3, n - n // 2, 128)
        torch.testing.assert_close(m.encode_visible(perturbed(mask), mask), base, rtol=0, atol=1e-6)
        one_visible = torch.zeros_like(mask)
        one_visible[:, (~mask[0]).nonzero()[0]] = True  # a visible patch of row 0 (may be hidden elsewhere)
        changed = m.encode_visible(perturbed(one_visible & ~mask), mask)
        assert not torch.allclose(changed[0], base[0], atol=1e-3)


def test_unequal_or_misshapen_masks_raise() -> None:
    m = make_backbone("vit_micro", in_channels=1, img_size=8, patch_size=4)
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="same count"):
        m.encode_visible(x, torch.tensor([[True, False, False, False], [True, True, False, False]]))
    with pytest.raises(ValueError, match=r"bool \[B, 4\]"):
        m.encode_visible(x, torch.zeros(2, 5, dtype=torch.bool))


@pytest.mark.bench
def test_convnet_small_throughput_printed(capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    m = make_backbone("convnet_small", in_channels=1, width=32)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    views = torch.randn(2 * 256, 1, 28, 28)  # 256 samples × 2 views, one pass as the objectives do
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = m(views).square().mean()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    assert torch.isfinite(loss)
    step = sorted(times[1:])[len(times[1:]) // 2]
    with capsys.disabled():
        print(f"\nconvnet_small w=32, 28x28, batch 256 two-view fwd+bwd: {256 / step:.0f} samples/s "
              f"({step * 1000:.0f} ms/step, {torch.get_num_threads()} threads)")
