"""Batch fields → model inputs: clip tuples (video `output: order`) keep their clip axis; the order label stays int."""
from __future__ import annotations

import numpy as np
import torch

from selfsup.trainers.inputs import normalize_uint8, to_device


def test_clip_tuples_become_channels_first_per_clip_and_normalized_like_single_clips() -> None:
    rng = np.random.default_rng(0)
    clips = rng.integers(0, 256, (2, 3, 4, 5, 6, 3), dtype=np.uint8)  # [B, n, t, H, W, C]
    batch = {"clips": clips, "order": np.array([5, 0], np.int64), "key": np.array(["a", "b"])}
    out = to_device(batch, torch.device("cpu"))
    assert sorted(out) == ["clips", "order"]
    assert out["clips"].shape == (2, 3, 3, 4, 5, 6) and out["clips"].dtype == torch.float32  # [B, n, C, t, H, W]
    assert out["order"].dtype == torch.int64 and out["order"].tolist() == [5, 0]
    for i in range(3):  # clip i equals the 5-D path's [B, C, t, H, W] of that clip alone
        single = normalize_uint8(torch.from_numpy(clips[:, i]), None, None)
        assert torch.equal(out["clips"][:, i], single)
    gray = to_device({"clips": clips[..., :1]}, torch.device("cpu"), [0.5], [0.25])["clips"]
    assert torch.allclose(gray, (torch.from_numpy(clips[..., :1]).permute(0, 1, 5, 2, 3, 4) / 255.0 - 0.5) / 0.25)
