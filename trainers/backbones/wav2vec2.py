"""wav2vec 2.0 encoders: a strided conv feature encoder over raw audio and a transformer context network.

The conv stack turns S samples into N frames (each layer: floor((L - k) / s) + 1, as in
`conv_frames`). Valid frames depend only on valid samples: the first layer's group norm is
computed over valid time steps only, padded frames are zeroed before the transformer and
hidden from attention, so the zeros (or anything else) after a row's `length` never change
that row's outputs.

The objective (trainers/objectives/wav2vec2.py) drives the pieces one by one:
`features` → `project` → (mask embedding) → `context`; `forward` chains them for evaluation.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union, cast, overload

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from selfsup.trainers.backbones import BACKBONES
from selfsup.trainers.backbones.context_network import ContextNetwork

# The paper's conv feature encoder: [channels, kernel, stride] per layer; 20 ms hop, 25 ms field.
BASE_CONV_LAYERS: list[list[int]] = [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2
ATTENTION_MASK_VALUE = -1e4  # finite, so a row with no valid frame stays finite (fp16-safe too)


@overload
def conv_frames(samples: int, conv_layers: Sequence[Sequence[int]]) -> int: ...
@overload
def conv_frames(samples: Tensor, conv_layers: Sequence[Sequence[int]]) -> Tensor: ...
def conv_frames(samples: Union[int, Tensor], conv_layers: Sequence[Sequence[int]]) -> Union[int, Tensor]:
    """Frames the conv stack makes from `samples` (int or long tensor): floor((L - k) / s) + 1 per layer, >= 0."""
    n = samples
    for _, k, s in conv_layers:
        if isinstance(n, Tensor):
            n = (torch.div(n - k, s, rounding_mode="floor") + 1).clamp(min=0)
        else:
            n = max((n - k) // s + 1, 0)
    return n


def receptive_field(conv_layers: Sequence[Sequence[int]]) -> int:
    """Samples one frame sees (400 for the paper's stack: 25 ms at 16 kHz)."""
    field, jump = 1, 1
    for _, k, s in conv_layers:
        field += (k - 1) * jump
        jump *= s
    return field


def valid_mask(lengths: Tensor, width: int) -> Tensor:
    """True where position < length: bool [B, width]."""
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


def masked_instance_norm(x: Tensor, valid: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """GroupNorm(C groups over C channels) with statistics over valid time steps only, in float32.

    Args:
        x: [B, C, L]; valid: bool [B, L]; weight, bias: [C].
    """
    dtype = x.dtype
    x = x.float()
    v = valid[:, None, :].to(x.dtype)  # [B, 1, L]
    n = v.sum(-1, keepdim=True).clamp(min=1.0)  # [B, 1, 1]
    mean = (x * v).sum(-1, keepdim=True) / n  # [B, C, 1]
    var = ((x - mean).pow(2) * v).sum(-1, keepdim=True) / n  # [B, C, 1]
    x = (x - mean) * torch.rsqrt(var + eps)
    return (x * weight.float()[None, :, None] + bias.float()[None, :, None]).to(dtype)


def _init_bert(module: nn.Module) -> None:
    """fairseq's init_bert_params for the transformer: N(0, 0.02) linears, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _init_pos_conv(transformer: nn.Module, embed_dim: int) -> None:
    """fairseq's init of the weight-normed positional conv: N(0, sqrt(4 / (k * D))), zero bias."""
    conv = cast(Any, transformer).pos_conv_embed.conv  # a Conv1d under torch's weight_norm parametrization
    std = (4.0 / (int(conv.kernel_size[0]) * embed_dim)) ** 0.5
    with torch.no_grad():
        v = conv.parametrizations.weight.original1  # [D, D / groups, k]
        v.normal_(0.0, std)
        conv.parametrizations.weight.original0.copy_(v.norm(dim=(0, 1), keepdim=True))  # weight_norm dim=2
        nn.init.zeros_(conv.bias)


class Wav2Vec2Encoder(nn.Module):
    """Conv feature encoder → layer norm → projection → transformer; forward pools valid frames."""

    conv_layers: list[list[int]]  # [channels, kernel, stride] per conv layer
    out_dim: int  # transformer width D
    feat_dim: int  # conv feature width C

    def __init__(
        self,
        conv_layers: Sequence[Sequence[int]],
        embed_dim: int,
        num_layers: int,
        num_heads: int,
        ffn_dim: int,
        pos_conv_kernel: int,
        pos_conv_groups: int,
        dropout: float,
        attention_dropout: float,
        activation_dropout: float,
        input_dropout: float,
        layer_drop: float,
        conv_norm: str,
        conv_bias: bool,
    ) -> None:
        super().__init__()
        _check_args(conv_layers, embed_dim, num_heads, pos_conv_groups, conv_norm)
        self.conv_layers = [[int(c), int(k), int(s)] for c, k, s in conv_layers]
        self.conv_norm = conv_norm
        self.out_dim = int(embed_dim)
        convs: list[nn.Module] = []
        norms: list[nn.Module] = []
        in_ch = 1
        for i, (ch, k, s) in enumerate(self.conv_layers):
            conv = nn.Conv1d(in_ch, ch, k, stride=s, bias=conv_bias)
            nn.init.kaiming_normal_(conv.weight)
            convs.append(conv)
            if conv_norm == "layer":
                norms.append(nn.LayerNorm(ch))
            elif i == 0:  # "group": one per-channel norm after the first conv, as in BASE
                norms.append(nn.GroupNorm(ch, ch))
            in_ch = ch
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList(norms)
        self.feat_dim = in_ch
        self.feature_norm = nn.LayerNorm(in_ch)
        self.feature_proj = nn.Linear(in_ch, embed_dim)
        self.input_dropout = nn.Dropout(input_dropout)
        self.transformer = ContextNetwork(
            in_ch, embed_dim, num_layers, num_heads, ffn_dim, pos_conv_kernel, pos_conv_groups, dropout,
            attention_dropout, activation_dropout, layer_drop)
        self.transformer.apply(_init_bert)
        _init_pos_conv(self.transformer, embed_dim)

    def frame_count(self, samples: int) -> int:
        """Frames made from `samples` samples (see `conv_frames`)."""
        return conv_frames(int(samples), self.conv_layers)

    def features(self, wave: Tensor, length: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Conv features before projection [B, N, C] and valid frames per row [B] (long)."""
        if wave.ndim != 2:
            raise ValueError(f"wave must be [B, S] raw audio, got shape {tuple(wave.shape)}; drop channel axes first")
        field = receptive_field(self.conv_layers)
        if wave.shape[1] < field:
            raise ValueError(f"wave has {wave.shape[1]} samples, fewer than one frame needs ({field}); pad or crop longer")
        b, s = wave.shape
        lengths = torch.full((b,), s, dtype=torch.long, device=wave.device) if length is None else length.long()
        lengths = lengths.clamp(max=s)
        x = wave.unsqueeze(1)  # [B, 1, S]
        for i, (conv, (_, k, st)) in enumerate(zip(self.convs, self.conv_layers)):
            x = conv(x)  # [B, C, L]
            lengths = conv_frames(lengths, [[0, k, st]])
            if self.conv_norm == "layer":
                x = self.norms[i](x.transpose(1, 2)).transpose(1, 2)
            elif i == 0:
                norm = cast(nn.GroupNorm, self.norms[0])
                x = masked_instance_norm(x, valid_mask(lengths, x.shape[-1]), norm.weight, norm.bias, norm.eps)
            x = F.gelu(x)
        return x.transpose(1, 2), lengths  # [B, N, C], [B]

    def project(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        """Layer-normed features [B, N, C] (the quantizer's input) and their projection [B, N, D]."""
        normed = self.feature_norm(feats)
        return normed, self.input_dropout(self.feature_proj(normed))

    def context(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """Transformer outputs [B, N, D] for projected (possibly masked) frames; padding_mask True = padded."""
        if padding_mask is None:
            return cast(Tensor, self.transformer(x))
        b, n, _ = x.shape
        x = x.masked_fill(padding_mask[..., None], 0.0)  # the pos conv must not see padded content
        bias = torch.zeros(b, 1, 1, n, dtype=x.dtype, device=x.device)
        bias = bias.masked_fill(padding_mask[:, None, None, :], ATTENTION_MASK_VALUE).expand(b, 1, n, n)
        return cast(Tensor, self.transformer(x, attention_mask=bias))

    def forward(self, wave: Tensor, length: Optional[Tensor] = None) -> Tensor:
        """Mean of context outputs over each row's valid frames: wave [B, S] → [B, out_dim]."""
        feats, frame_len = self.features(wave, length)
        _, x = self.project(feats)
        valid = valid_mask(frame_len, x.shape[1])  # [B, N]
        c = self.context(x, ~valid)  # [B, N, D]
        return pool_valid(c, valid)


def pool_valid(x: Tensor, valid: Tensor) -> Tensor:
    """Mean over valid positions: x [B, N, D], valid bool [B, N] → [B, D] (zeros for empty rows)."""
    w = valid.to(x.dtype)[..., None]  # [B, N, 1]
    return (x * w).sum(1) / w.sum(1).clamp(min=1.0)


def _check_args(
    conv_layers: Sequence[Sequence[int]], embed_dim: int, num_heads: int, pos_conv_groups: int, conv_norm: str
) -> None:
    """ValueErrors for arguments the modules would reject later with less helpful messages."""
    if not conv_layers or any(len(layer) != 3 for layer in conv_layers):
        raise ValueError(f"conv_layers must be a non-empty list of [channels, kernel, stride], got {conv_layers!r}")
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}; pick a divisor")
    if embed_dim % pos_conv_groups:
        raise ValueError(f"embed_dim={embed_dim} is not divisible by pos_conv_groups={pos_conv_groups}; pick a divisor")
    if conv_norm not in ("group", "layer"):
        raise ValueError(f"conv_norm={conv_norm!r} is not one of 'group' (BASE) or 'layer' (LARGE)")


@BACKBONES.register("wav2vec2_small")
def wav2vec2_small(
    conv_dim: int = 128,
    embed_dim: int = 192,
    num_layers: int = 4,
    num_heads: int = 4,
    ffn_dim: int = 768,
    pos_conv_kernel: int = 32,
    pos_conv_groups: int = 8,
    dropout: float = 0.1,
    attention_dropout: float = 0.1,
    activation_dropout: float = 0.0,
    input_dropout: float = 0.1,
    layer_drop: float = 0.0,
    conv_norm: str = "group",
    conv_bias: bool = False,
) -> Wav2Vec2Encoder:
    """A CPU-sized wav2vec 2.0: BASE's kernel/stride stack with `conv_dim` channels, a small transformer."""
    conv_layers = [[conv_dim, k, s] for _, k, s in BASE_CONV_LAYERS]
    return Wav2Vec2Encoder(
        conv_layers, embed_dim, num_layers, num_heads, ffn_dim, pos_conv_kernel, pos_conv_groups,
        dropout, attention_dropout, activation_dropout, input_dropout, layer_drop, conv_norm, conv_bias,
    )


@BACKBONES.register("wav2vec2_base")
def wav2vec2_base(
    embed_dim: int = 768,
    num_layers: int = 12,
    num_heads: int = 8,
    ffn_dim: int = 3072,
    pos_conv_kernel: int = 128,
    pos_conv_groups: int = 16,
    dropout: float = 0.1,
    attention_dropout: float = 0.1,
    activation_dropout: float = 0.0,
    input_dropout: float = 0.1,
    layer_drop: float = 0.05,
    conv_norm: str = "group",
    conv_bias: bool = False,
) -> Wav2Vec2Encoder:
    """The paper's BASE: 7-layer 512-channel conv encoder, 12 post-LN layers of dim 768, FFN 3072, 8 heads."""
    return Wav2Vec2Encoder(
        BASE_CONV_LAYERS, embed_dim, num_layers, num_heads, ffn_dim, pos_conv_kernel, pos_conv_groups,
        dropout, attention_dropout, activation_dropout, input_dropout, layer_drop, conv_norm, conv_bias,
    )
