"""audio_cnn_small and video_cnn_small through the registry: shapes, gradients, toy tasks, reload, throughput."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from selfsup.trainers.backbones import BACKBONES, make_backbone


pytestmark = pytest.mark.usefixtures("single_thread")


def _samples_per_s(model: nn.Module, x: torch.Tensor, iters: int = 2) -> float:
    """Forward+backward samples/s of the fastest of `iters` steps after one warm-up (steadier on a shared host)."""
    model.train()
    model(x).pow(2).mean().backward()
    best = float("inf")
    for _ in range(iters):
        start = time.perf_counter()
        model.zero_grad()
        model(x).pow(2).mean().backward()
        best = min(best, time.perf_counter() - start)
    return x.shape[0] / best


def _train_probe(encoder: nn.Module, make_batch, steps: int, lr: float) -> float:
    """Train encoder + linear head on fresh toy batches; held-out accuracy in eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(encoder, nn.Linear(encoder.out_dim, 2))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        x, y = make_batch(16)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # BN running stats lag fast-moving toy weights: refresh them on the final ones
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # cumulative average
        for _ in range(4):
            model(make_batch(32)[0])
        x, y = make_batch(128)
        model.eval()
        return float((model(x).argmax(1) == y).float().mean())


def _band_spectrograms(g: torch.Generator):
    """Log-mel-like noise with energy in a low (class 0) or high (class 1) mel band."""

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 2, (n,), generator=g)
        spec = torch.randn(n, 64, 32, generator=g)  # [B, F, T]
        lo = torch.where(y == 0, 6, 42)
        rows = torch.arange(64)[None, :]
        band = (rows >= lo[:, None]) & (rows < lo[:, None] + 10)  # [B, F]
        return spec + 2.0 * band[:, :, None].float(), y

    return make


def _moving_blobs(g: torch.Generator, frames: int = 8, size: int = 32, speed: float = 2.0):
    """Clips of a Gaussian blob drifting left (class 0) or right (class 1), wrapping around.

    Start positions are uniform and motion wraps, so every single frame has the same distribution
    for both classes: only motion tells them apart.
    """
    grid = torch.arange(size).float()

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 2, (n,), generator=g)
        x0, y0 = torch.rand(n, generator=g) * size, torch.rand(n, generator=g) * size
        clip = []
        for t in range(frames):
            cx = (x0 + (2 * y - 1) * speed * t) % size
            dx = (grid[None, :] - cx[:, None]).abs()
            dx = torch.minimum(dx, size - dx)  # [B, W] distance on the torus
            dy = grid[None, :] - y0[:, None]  # [B, H]
            clip.append(torch.exp(-(dy[:, :, None] ** 2 + dx[:, None, :] ** 2) / 18.0))  # [B, H, W]
        video = torch.stack(clip, 1)[:, None].expand(-1, 3, -1, -1, -1)  # [B, 3, T, H, W]
        return (video + 0.1 * torch.randn(video.shape, generator=g)).contiguous(), y

    return make


def test_registered() -> None:
    assert "audio_cnn_small" in BACKBONES and "video_cnn_small" in BACKBONES


@pytest.mark.parametrize(
    "name, args, shape, out_dim",
    [
        ("audio_cnn_small", {}, (3, 64, 96), 256),
        ("audio_cnn_small", {"n_mels": 40, "width": 8, "out_dim": 24}, (3, 40, 50), 24),
        ("audio_cnn_small", {"width": 8, "out_dim": 24, "pool": "cat"}, (3, 64, 50), 48),
        ("video_cnn_small", {}, (2, 3, 16, 64, 64), 128),
        ("video_cnn_small", {"in_channels": 1, "width": 4, "out_dim": 10}, (2, 1, 6, 20, 28), 10),
    ],
)
def test_forward_shape_and_gradients(name: str, args: dict, shape: tuple[int, ...], out_dim: int) -> None:
    torch.manual_seed(0)
    model = make_backbone(name, **args)
    x = torch.randn(shape)
    out = model(x)
    assert model.out_dim == out_dim and out.shape == (shape[0], out_dim)
    out.pow(2).mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} gets a zero gradient"


def test_audio_accepts_channel_axis_and_rejects_wrong_mels() -> None:
    model = make_backbone("audio_cnn_small", width=8).eval()
    spec = torch.randn(2, 64, 40)
    assert torch.allclose(model(spec), model(spec[:, None]))
    with pytest.raises(ValueError, match="n_mels"):
        model(torch.randn(2, 80, 40))
    with pytest.raises(ValueError, match="n_mels"):
        make_backbone("audio_cnn_small", n_mels=4)
    with pytest.raises(ValueError, match="pool='avg' unknown; valid: sum, cat"):
        make_backbone("audio_cnn_small", pool="avg")


def test_audio_cat_pool_holds_max_and_mean_side_by_side() -> None:
    torch.manual_seed(0)
    summed = make_backbone("audio_cnn_small", width=8, out_dim=16).eval()
    torch.manual_seed(0)
    cat = make_backbone("audio_cnn_small", width=8, out_dim=16, pool="cat").eval()
    spec = torch.randn(2, 64, 40)
    both = cat(spec)  # same weights: [max, mean] must add up to the summed embedding
    assert both.shape == (2, 32) and torch.allclose(both[:, :16] + both[:, 16:], summed(spec), atol=1e-6)


def test_video_rejects_channels_last() -> None:
    model = make_backbone("video_cnn_small", width=4)
    with pytest.raises(ValueError, match="channels before time"):
        model(torch.randn(2, 8, 32, 32, 3))


def test_audio_cnn_learns_frequency_bands() -> None:
    g = torch.Generator().manual_seed(1)
    acc = _train_probe(make_backbone("audio_cnn_small", width=8), _band_spectrograms(g), steps=20, lr=3e-3)
    assert acc >= 0.95, acc


def test_video_cnn_learns_motion_direction() -> None:
    g = torch.Generator().manual_seed(2)
    acc = _train_probe(make_backbone("video_cnn_small", width=8), _moving_blobs(g), steps=40, lr=3e-3)
    assert acc >= 0.9, acc


@pytest.mark.parametrize(
    "name, args, shape",
    [("audio_cnn_small", {"width": 8}, (2, 64, 48)), ("video_cnn_small", {"width": 4}, (2, 3, 8, 32, 32))],
)
def test_state_dict_reloads_into_fresh_backbone(name: str, args: dict, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    trained = make_backbone(name, **args)
    trained(torch.randn(shape)).sum().backward()  # BN running stats move off their init
    fresh = make_backbone(name, **args)
    fresh.load_state_dict(trained.state_dict())
    x = torch.randn(shape)
    assert torch.equal(trained.eval()(x), fresh.eval()(x))


@pytest.mark.bench
def test_throughput_printed(single_thread: int) -> None:
    torch.set_num_threads(single_thread)
    torch.manual_seed(0)
    audio = _samples_per_s(make_backbone("audio_cnn_small"), torch.randn(128, 64, 96))
    video = _samples_per_s(make_backbone("video_cnn_small"), torch.randn(32, 3, 16, 64, 64))
    print(
        f"\naudio_cnn_small fwd+bwd: {audio:.0f} samples/s (batch 128, 64 mels x 96 frames, "
        f"{torch.get_num_threads()} threads)"
        f"\nvideo_cnn_small fwd+bwd: {video:.1f} clips/s (batch 32, 3x16x64x64)"
    )
