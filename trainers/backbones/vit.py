"""Vision Transformers over image patches, video tubelets or spectrogram patches (timm Blocks).

Position embeddings are fixed sine-cosine; there is no CLS token: features are the mean of the
final tokens. `encode_visible` drops masked tokens before the first block (MAE-style).
"""
from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import nn

from selfsup.trainers.backbones import BACKBONES
from selfsup.trainers.backbones.tokenizers import make_tokenizer, sincos_pos_embed


def keep_indices(mask: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Indices [B, N_vis] of the visible tokens (mask False), ascending; every row must hide as many."""
    if mask.ndim != 2 or mask.shape[1] != num_tokens or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be bool [B, {num_tokens}] (True = hidden) for this token grid; "
            f"got {mask.dtype} {tuple(mask.shape)}; draw masks with the objective's mask_spec geometry"
        )
    hidden = mask.sum(dim=1)  # [B]
    if bool((hidden != hidden[0]).any()):
        raise ValueError(
            f"mask rows hide different numbers of tokens ({sorted(set(hidden.tolist()))}); "
            f"every row must hide exactly the same count"
        )
    n_vis = num_tokens - int(hidden[0])
    if n_vis < 1:
        raise ValueError("mask hides every token; lower the mask ratio so some stay visible")
    # A stable sort puts the visible (0) tokens first, in their grid order.
    return torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, :n_vis]  # [B, N_vis]


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` [B, K] of tokens [B, N, D] → [B, K, D]."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def transformer_blocks(dim: int, depth: int, heads: int, mlp_ratio: float = 4.0) -> nn.Sequential:
    """`depth` pre-norm timm Blocks, Xavier-initialised as in MAE."""
    if dim % heads:
        raise ValueError(f"transformer dim {dim} is not divisible by heads {heads}")
    norm: Any = partial(nn.LayerNorm, eps=1e-6)  # timm's own ViT passes a partial here too
    blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)])
    for m in blocks.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return blocks


class ViTBackbone(nn.Module):
    """Tokenizer + fixed sin-cos positions + transformer blocks + LayerNorm; forward → [B, dim]."""

    pos_embed: torch.Tensor

    def __init__(
        self, modality: str, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, **tokenizer_args: Any
    ) -> None:
        super().__init__()
        self.modality = modality
        self.tokenizer = make_tokenizer(modality, dim, **tokenizer_args)
        self.grid: tuple[int, ...] = self.tokenizer.grid
        self.num_tokens = int(torch.Size(self.grid).numel())
        self.register_buffer("pos_embed", sincos_pos_embed(dim, self.grid)[None], persistent=False)  # [1, N, D]
        self.blocks = transformer_blocks(dim, depth, heads, mlp_ratio)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.out_dim = dim

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embeddings plus positions [B, N, D], row-major over the grid."""
        return self.tokenizer(x) + self.pos_embed  # [B, N, D]

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run tokens [B, K, D] through the blocks and the final norm → [B, K, D]."""
        return self.norm(self.blocks(tokens))

    def encode_visible(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encode only the visible tokens (mask False) → [B, N_vis, D]; hidden ones never enter a block."""
        return self.encode_kept(x, keep_indices(mask, self.num_tokens))

    def encode_kept(self, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Encode only the tokens at grid indices ids_keep [B, K] → [B, K, D]."""
        return self.encode(gather_tokens(self.tokens(x), ids_keep))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of the final tokens [B, D]."""
        return self.encode(self.tokens(x)).mean(dim=1)


def register_vit(size: str, dim: int, depth: int, heads: int) -> None:
    """Register the ViT size `size` as a backbone taking `modality` and its tokenizer arguments."""

    def build(modality: str = "image", mlp_ratio: float = 4.0, **tokenizer_args: Any) -> ViTBackbone:
        return ViTBackbone(modality, dim, depth, heads, mlp_ratio, **tokenizer_args)

    build.__name__ = size
    build.__doc__ = f"ViT {size} (dim {dim}, depth {depth}, heads {heads}) over `modality` tokens."
    BACKBONES.register(size)(build)


register_vit("vit_micro", 128, 4, 4)
register_vit("vit_tiny", 192, 12, 3)
register_vit("vit_small", 384, 12, 6)
register_vit("vit_base", 768, 12, 12)
