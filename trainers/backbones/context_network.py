"""The wav2vec 2.0 context network: a convolutional positional embedding, then post-LN transformer layers.

This is the transformer that torchaudio's private `_get_encoder` built (torchaudio 2.x,
`torchaudio.models.wav2vec2.components`, BSD-2-Clause; after fairseq's wav2vec2), written out here
so selfsup depends on no private torchaudio function. It keeps, on purpose, everything that makes
a model built from a seed and a checkpoint compute what it computed before:
- module and parameter names (`pos_conv_embed.conv.parametrizations.weight.original0`,
  `layers.0.attention.k_proj.weight`, …), so earlier checkpoints load;
- the order modules are created in (k, v, q, out projections), and a discarded feature projection
  drawn first as torchaudio's encoder did, so a seed gives the same initial weights;
- one `torch.rand(1)` per layer in training for layer drop, even at layer_drop=0, so dropout
  draws the same random numbers.
tests/trainers/test_wav2vec2.py checks all three against outputs of the torchaudio-based version.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class PositionalConv(nn.Module):
    """A grouped, weight-normed Conv1d over frames (same length out), then GELU: [B, N, D] → [B, N, D]."""

    def __init__(self, embed_dim: int, kernel_size: int, groups: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        conv = nn.Conv1d(embed_dim, embed_dim, kernel_size, padding=kernel_size // 2, groups=groups)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.num_remove = 1 if kernel_size % 2 == 0 else 0  # an even kernel makes one frame too many

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x.transpose(1, 2))  # [B, D, N (+1)]
        if self.num_remove:
            y = y[..., : -self.num_remove]
        return F.gelu(y).transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head self-attention with an additive mask [B, 1, N, N]."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.dropout = num_heads, embed_dim // num_heads, dropout
        self.k_proj = nn.Linear(embed_dim, embed_dim)  # created in torchaudio's order: k, v, q, out
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        b, n, d = x.shape
        shape = (b, n, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(*shape).transpose(2, 1)  # [B, H, N, Dh]
        k = self.k_proj(x).view(*shape).transpose(2, 1)
        v = self.v_proj(x).view(*shape).transpose(2, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class FeedForward(nn.Module):
    """Linear → GELU → dropout → linear → dropout."""

    def __init__(self, embed_dim: int, hidden: int, hidden_dropout: float, dropout: float) -> None:
        super().__init__()
        self.intermediate_dense = nn.Linear(embed_dim, hidden)
        self.intermediate_dropout = nn.Dropout(hidden_dropout)
        self.output_dense = nn.Linear(hidden, embed_dim)
        self.output_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.intermediate_dropout(F.gelu(self.intermediate_dense(x)))
        return self.output_dropout(self.output_dense(x))


class EncoderLayer(nn.Module):
    """Post-LN transformer layer (BASE): x = LN(x + attn(x)); x = LN'(x + ffn(x))."""

    def __init__(self, embed_dim: int, num_heads: int, ffn_dim: int, dropout: float, attention_dropout: float,
                 activation_dropout: float) -> None:
        super().__init__()
        self.attention = SelfAttention(embed_dim, num_heads, attention_dropout)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(embed_dim)
        self.feed_forward = FeedForward(embed_dim, ffn_dim, activation_dropout, dropout)
        self.final_layer_norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        x = self.layer_norm(x + self.dropout(self.attention(x, attention_mask)))
        return self.final_layer_norm(x + self.feed_forward(x))


class ContextNetwork(nn.Module):
    """x + pos_conv(x) → LayerNorm → dropout → layers (each skipped with p=layer_drop in training): [B, N, D]."""

    def __init__(self, in_features: int, embed_dim: int, num_layers: int, num_heads: int, ffn_dim: int,
                 pos_conv_kernel: int, pos_conv_groups: int, dropout: float, attention_dropout: float,
                 activation_dropout: float, layer_drop: float) -> None:
        super().__init__()
        nn.Linear(in_features, embed_dim)  # drawn, not kept: torchaudio's encoder made its projection first
        pos_conv_embed = PositionalConv(embed_dim, pos_conv_kernel, pos_conv_groups)
        layers = nn.ModuleList(
            EncoderLayer(embed_dim, num_heads, ffn_dim, dropout, attention_dropout, activation_dropout)
            for _ in range(num_layers))
        self.pos_conv_embed = pos_conv_embed  # registered in torchaudio's order: state_dict keys list alike
        self.layer_norm = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.layers = layers
        self.layer_drop = layer_drop

    def forward(self, x: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        x = self.dropout(self.layer_norm(x + self.pos_conv_embed(x)))
        for layer in self.layers:
            if not (self.training and torch.rand(1).item() <= self.layer_drop):
                x = layer(x, attention_mask)
        return x
