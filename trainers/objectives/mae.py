"""Masked autoencoding (MAE, He et al. 2022) on image patches, video tubelets (VideoMAE) and
spectrogram patches (Audio-MAE): one objective, the ViT's tokenizer picks the modality.

The encoder sees only the visible tokens; a light decoder fills the hidden ones with a learned
mask token, adds fixed sin-cos positions and regresses each hidden patch's (normalized) values.
"""
from __future__ import annotations

import inspect
from typing import Any, Optional, cast

import torch
from torch import nn

from selfsup.trainers.backbones import backbone_builder, make_backbone
from selfsup.trainers.backbones.tokenizers import sincos_pos_embed
from selfsup.trainers.backbones.vit import ViTBackbone, keep_indices, transformer_blocks
from selfsup.trainers.objectives import OBJECTIVES
from selfsup.trainers.objectives.base import LossOutput, split_decay
from selfsup.trainers.objectives.heads import batch_fields

INPUT_FIELD = {"image": "image", "video": "video", "audio": "spec"}
DEFAULT_RATIO = {"image": 0.75, "video": 0.9, "audio": 0.8}
MASK_KIND = {"image": "random", "video": "tube", "audio": "random"}


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """MSE over hidden tokens only; pred, target [B, N, P], mask [B, N] (True = hidden).

    With `norm_pix` each target patch is standardized by its own mean and variance.
    """
    target = target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_token = (pred.float() - target).square().mean(dim=-1)  # [B, N]
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum()


class MAEDecoder(nn.Module):
    """Visible latents + learned mask tokens at the hidden slots → per-patch predictions [B, N, P]."""

    pos_embed: torch.Tensor

    def __init__(self, in_dim: int, grid: tuple[int, ...], patch_dim: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("pos_embed", sincos_pos_embed(dim, grid)[None], persistent=False)  # [1, N, dim]
        self.blocks = transformer_blocks(dim, depth, heads)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_dim)
        for layer in (self.embed, self.pred):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, latent: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Predictions [B, N, P] from visible latents [B, N_vis, D] sitting at grid slots ids_keep [B, N_vis]."""
        x = self.embed(latent)  # [B, N_vis, d]
        b, _, d = x.shape
        full = self.mask_token.to(x.dtype).expand(b, self.pos_embed.shape[1], d)  # [B, N, d]
        full = full.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, d), x)  # visible back in place
        return self.pred(self.norm(self.blocks(full + self.pos_embed)))  # [B, N, P]


@OBJECTIVES.register("mae")
class MAEObjective(nn.Module):
    """ViT encoder on visible tokens + light decoder; MSE on the hidden patches."""

    def __init__(
        self,
        modality: str,
        backbone: str,
        backbone_args: dict[str, Any],
        mask_ratio: Optional[float] = None,
        norm_pix_loss: bool = True,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
    ) -> None:
        super().__init__()
        if modality not in INPUT_FIELD:
            raise ValueError(f"mae has no input for modality {modality!r}; valid: {', '.join(sorted(INPUT_FIELD))}")
        args = dict(backbone_args)
        if args.setdefault("modality", modality) != modality:
            raise ValueError(
                f"mae modality {modality!r} but backbone_args.modality {args['modality']!r}; make them agree"
            )
        ratio = DEFAULT_RATIO[modality] if mask_ratio is None else float(mask_ratio)
        if not 0 < ratio < 1:
            raise ValueError(f"mae mask_ratio={ratio}; it must lie strictly between 0 and 1")
        self.modality, self.mask_ratio, self.norm_pix_loss = modality, ratio, bool(norm_pix_loss)
        self.needs: tuple[str, ...] = (INPUT_FIELD[modality], "mask")
        self.backbone_name, self.backbone_args = backbone, args
        if "modality" not in inspect.signature(backbone_builder(backbone)).parameters:
            raise ValueError(f"mae needs a token backbone taking `modality` (a vit_* one); {backbone!r} is not one")
        self.backbone = cast(ViTBackbone, make_backbone(backbone, **args))  # duck-typed: any token backbone
        tok = self.backbone.tokenizer
        self.decoder = MAEDecoder(
            self.backbone.out_dim, tuple(tok.grid), tok.patch_dim, decoder_dim, decoder_depth, decoder_heads
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        """Reconstruction loss on the hidden tokens of batch[input] under batch["mask"]."""
        x, mask = batch_fields(batch, self.needs, "mae")
        ids_keep = keep_indices(mask, self.backbone.num_tokens)  # [B, N_vis]
        latent = self.backbone.encode_kept(x, ids_keep)  # [B, N_vis, D]; hidden tokens never enter
        pred = self.decoder(latent, ids_keep)  # [B, N, P]
        target = self.backbone.tokenizer.patchify(x)  # [B, N, P]
        loss = masked_mse(pred, target, mask, self.norm_pix_loss)
        hidden = 1 - ids_keep.shape[1] / self.backbone.num_tokens
        return LossOutput(loss=loss, metrics={"mask_ratio": hidden}, embedding=latent.mean(dim=1).detach())

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Decay on weights; none on biases, norms and the mask token."""
        return split_decay(list(self.named_parameters()), weight_decay)

    def after_step(self, step: int, total_steps: int) -> None:
        """Nothing to update between steps."""

    def encoder(self) -> nn.Module:
        """The ViT backbone evaluation loads (forward = mean of all tokens, no masking)."""
        return self.backbone

    def encoder_spec(self) -> dict[str, Any]:
        """How to rebuild `encoder()` with make_backbone."""
        return {"backbone": self.backbone_name, "backbone_args": dict(self.backbone_args)}

    def mask_spec(self) -> Optional[dict[str, Any]]:
        """The masks the data pipeline must draw: kind, ratio and the tokenizer's geometry."""
        geometry = self.backbone.tokenizer.geometry()
        return {"kind": MASK_KIND[self.modality], "ratio": self.mask_ratio, "geometry": geometry}
