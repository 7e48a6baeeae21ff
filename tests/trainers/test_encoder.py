"""`load_encoder` on real checkpoint folders: a crafted meta.json cannot make it allocate a model of any size."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from selfsup.trainers import load_encoder

LIMIT = "over the limit of 2,000,000,000"


def checkpoint(root: Path, backbone: str, args: dict[str, Any]) -> Path:
    """A checkpoint folder holding only meta.json (the architecture is refused before encoder.pt is read)."""
    ckpt = root / "checkpoints" / "step-000001"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"backbone": backbone, "backbone_args": args, "step": 1}))
    return ckpt


@pytest.mark.parametrize("backbone,args,message", [
    ("convnet_small", {"width": 32768}, rf"'convnet_small' .* would hold 405,876,670,468 parameters and buffers "
                                        rf"\(the largest: features.3.0.weight \[262144, 131072, 3, 3\]\), {LIMIT}"),
    ("vit_micro", {"img_size": 65536, "patch_size": 1}, rf"\(the largest: pos_embed \[1, 4294967296, 128\]\), {LIMIT}"),
    ("convnet_small", {"width": 10**9}, "backbone_args.width=1000000000: .* finite number of at most 65536"),
    ("wav2vec2_small", {"num_layers": 300, "embed_dim": 8, "num_heads": 1, "ffn_dim": 8, "pos_conv_groups": 1},
     "backbone_args.num_layers=300 is over the limit of 256 layers"),
    ("vit_giant", {}, "unknown backbone 'vit_giant'; valid: audio_cnn_small"),
])
def test_a_crafted_meta_json_is_refused_naming_the_checkpoint_and_field(backbone: str, args: dict[str, Any],
                                                                       message: str, tmp_path: Path) -> None:
    ckpt = checkpoint(tmp_path / "run", backbone, args)
    with pytest.raises(ValueError, match=message) as err:
        load_encoder(str(tmp_path / "run"))
    assert str(err.value).startswith(f"{ckpt}/meta.json: ")
