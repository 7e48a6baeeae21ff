"""wav2vec 2.0 (Baevski et al., 2020): contrastive prediction of quantized conv features at masked frames.

Per step: conv features → layer norm → projection; frames masked by `batch["mask"]` take a learned
embedding before the transformer. A Gumbel product quantizer turns the unmasked (layer-normed)
features at masked frames into targets; each masked frame's projected context output must pick
its target out of K distractors drawn from other masked frames of the same utterance. Masked
frames at or beyond a row's valid frame count (padding) are neither targets nor distractors.

loss = contrastive + diversity_weight * (GV - perplexity) / GV + feature_penalty * mean(feats²)
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from selfsup.trainers.backbones import make_backbone
from selfsup.trainers.backbones.wav2vec2 import Wav2Vec2Encoder, pool_valid, valid_mask
from selfsup.trainers.objectives import OBJECTIVES
from selfsup.trainers.objectives.base import LossOutput, split_decay


def masked_frames(mask: Tensor, frame_lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Masked frame indices per row [B, M] (ascending) and which lie inside the valid length [B, M].

    Raises ValueError unless every row masks the same number (>= 1) of frames.
    """
    counts = mask.sum(1)  # [B]
    m = int(counts[0])
    if m == 0 or bool((counts != m).any()):
        raise ValueError(
            f"batch['mask'] must hold the same number (>= 1) of True per row, got {counts.tolist()}; "
            "make span masks with a fixed count per row (mask_spec()['ratio'])"
        )
    idx = mask.nonzero()[:, 1].view(mask.shape[0], m)  # row-major, so ascending within a row
    return idx, idx < frame_lengths[:, None]


def sample_negatives(counts: Tensor, m: int, k: int) -> Tensor:
    """For target j of row b, k indices drawn uniformly from [0, counts[b]) without j: long [B, M, K].

    Rows with counts < 2 have no distractors; their indices are arbitrary and must be ignored.
    """
    b = counts.shape[0]
    span = (counts - 1).clamp(min=1).to(torch.float32)[:, None, None]  # [B, 1, 1]
    r = (torch.rand(b, m, k, device=counts.device) * span).long()
    r = torch.minimum(r, span.long() - 1)
    self_idx = torch.arange(m, device=counts.device)[None, :, None]  # [1, M, 1]
    return (r + (r >= self_idx).long()).clamp(max=m - 1)  # skip the target itself


def gumbel_quantize(logits: Tensor, codebook: Tensor, tau: float, noisy: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Product quantization: logits [..., G, V], codebook [G, V, d] → (q [..., G*d], codes [..., G], probs [..., G, V]).

    With `noisy`, hard Gumbel-softmax samples with straight-through gradients; otherwise argmax.
    `probs` is the noise-free softmax the diversity loss averages.
    """
    probs = logits.float().softmax(-1)
    if noisy:
        onehot = F.gumbel_softmax(logits.float(), tau=tau, hard=True).to(logits.dtype)
    else:
        onehot = F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    codes = onehot.argmax(-1)  # [..., G]
    q = torch.einsum("...gv,gvd->...gd", onehot, codebook.to(onehot.dtype))  # [..., G, d]
    return q.flatten(-2), codes, probs


def perplexity(probs: Tensor) -> Tensor:
    """Sum over codebooks of exp(entropy) of averaged code probabilities [G, V]."""
    return torch.exp(-(probs * torch.log(probs + 1e-7)).sum(-1)).sum()


def contrastive_logits(x: Tensor, y: Tensor, neg_idx: Tensor, codes: Tensor, temp: float) -> Tensor:
    """Cosine logits / temp [B, M, 1+K]: column 0 the target; distractors with the target's codes get -inf.

    Args:
        x: predictions [B, M, F]; y: targets [B, M, F]; neg_idx: [B, M, K]; codes: [B, M, G].
    """
    b, m, k = neg_idx.shape
    flat = neg_idx.reshape(b, m * k)
    negs = y.gather(1, flat[..., None].expand(-1, -1, y.shape[-1])).view(b, m, k, -1)  # [B, M, K, F]
    neg_codes = codes.gather(1, flat[..., None].expand(-1, -1, codes.shape[-1])).view(b, m, k, -1)
    same = (neg_codes == codes[:, :, None, :]).all(-1)  # [B, M, K] a distractor identical to the target
    cand = torch.cat([y[:, :, None, :], negs], 2)  # [B, M, 1+K, F]
    logits = F.cosine_similarity(x[:, :, None, :].float(), cand.float(), dim=-1) / temp
    pad = torch.zeros_like(same[..., :1])
    return logits.masked_fill(torch.cat([pad, same], -1), float("-inf"))


def _scale_grad(x: Tensor, scale: float) -> Tensor:
    """Identity forward, gradient times `scale` (the paper's 0.1 on the conv feature encoder)."""
    return x if scale == 1.0 else x * scale + x.detach() * (1.0 - scale)


@OBJECTIVES.register("wav2vec2")
class Wav2Vec2Objective(nn.Module):
    """wav2vec 2.0 pretraining: masked context network, Gumbel product quantizer, contrastive + diversity."""

    needs = ("wave", "length", "mask")
    gumbel_temp: Tensor  # buffer [], the current Gumbel-softmax temperature

    def __init__(
        self,
        modality: str = "audio",
        backbone: str = "wav2vec2_small",
        backbone_args: Optional[dict[str, Any]] = None,
        num_codebooks: int = 2,
        codebook_size: int = 320,
        num_negatives: int = 100,
        logit_temp: float = 0.1,
        gumbel_temp: Sequence[float] = (2.0, 0.5, 0.999995),
        diversity_weight: float = 0.1,
        feature_penalty: float = 10.0,
        mask_prob: float = 0.65,
        mask_length: int = 10,
        mask_ratio: float = 0.5,
        final_dim: int = 256,
        codebook_dim: Optional[int] = None,
        feature_dropout: float = 0.1,
        feature_grad_mult: float = 0.1,
    ) -> None:
        super().__init__()
        _check_args(modality, gumbel_temp, num_negatives, codebook_dim or final_dim, num_codebooks)
        self.backbone_name = backbone
        self.backbone_args = dict(backbone_args or {})
        encoder = make_backbone(backbone, **self.backbone_args)
        if not isinstance(encoder, Wav2Vec2Encoder):
            raise ValueError(f"backbone {backbone!r} is not a wav2vec2 encoder; use wav2vec2_small or wav2vec2_base")
        self.backbone = encoder
        c, d = self.backbone.feat_dim, self.backbone.out_dim
        vq_dim = codebook_dim or final_dim
        self.num_codebooks, self.codebook_size = num_codebooks, codebook_size
        self.num_negatives, self.logit_temp = num_negatives, logit_temp
        self.max_temp, self.min_temp, self.temp_decay = (float(t) for t in gumbel_temp)
        self.diversity_weight, self.feature_penalty = diversity_weight, feature_penalty
        self.mask_prob, self.mask_length, self.mask_ratio = mask_prob, mask_length, mask_ratio
        self.feature_grad_mult = feature_grad_mult
        self.mask_emb = nn.Parameter(torch.empty(d).uniform_())  # [D]
        self.code_logits = nn.Linear(c, num_codebooks * codebook_size)
        nn.init.normal_(self.code_logits.weight, std=1.0)  # as fairseq: sharp code choices from the start
        nn.init.zeros_(self.code_logits.bias)
        self.codebook = nn.Parameter(torch.rand(num_codebooks, codebook_size, vq_dim // num_codebooks))
        self.project_q = nn.Linear(vq_dim, final_dim)
        self.final_proj = nn.Linear(d, final_dim)
        self.feature_dropout = nn.Dropout(feature_dropout)
        self.register_buffer("gumbel_temp", torch.tensor(self.max_temp))  # checkpointed with the objective

    def forward(self, batch: dict[str, Tensor]) -> LossOutput:
        """One step's loss on batch["wave"] [B, S], batch["length"] [B], batch["mask"] bool [B, N]."""
        wave, mask = batch["wave"], batch["mask"]
        feats, frame_len = self.backbone.features(wave, batch.get("length"))  # [B, N, C], [B]
        b, n, _ = feats.shape
        if mask.shape != (b, n):
            raise ValueError(
                f"batch['mask'] has shape {tuple(mask.shape)} but {wave.shape[1]} samples make {n} frames "
                f"(expected ({b}, {n})); draw masks over mask_spec()['geometry']['conv_layers']"
            )
        mask = mask.bool()
        valid = valid_mask(frame_len, n)  # [B, N]
        feats = _scale_grad(feats, self.feature_grad_mult)
        pen = (feats.float().pow(2).mean(-1) * valid).sum() / valid.sum().clamp(min=1)  # valid frames only
        normed, x = self.backbone.project(feats)  # [B, N, C], [B, N, D]
        x = torch.where(mask[..., None], self.mask_emb.to(x.dtype), x)
        ctx = self.backbone.context(x, ~valid)  # [B, N, D]

        idx, used = masked_frames(mask, frame_len)  # [B, M], [B, M]
        m, counts = idx.shape[1], used.sum(1)  # counts: valid masked frames per row
        pred = self.final_proj(ctx.gather(1, idx[..., None].expand(-1, -1, ctx.shape[-1])))  # [B, M, F]
        unmasked = self.feature_dropout(normed).gather(1, idx[..., None].expand(-1, -1, normed.shape[-1]))
        logits = self.code_logits(unmasked).view(b, m, self.num_codebooks, self.codebook_size)
        q, codes, probs = gumbel_quantize(logits, self.codebook, float(self.gumbel_temp), self.training)
        y = self.project_q(q)  # [B, M, F]

        neg_idx = sample_negatives(counts, m, self.num_negatives)  # [B, M, K]
        scores = contrastive_logits(pred, y, neg_idx, codes, self.logit_temp)  # [B, M, 1+K]
        scored = used & (counts >= 2)[:, None]  # targets that have distractors
        scores = scores[scored]  # [T, 1+K]
        target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
        ce = F.cross_entropy(scores, target, reduction="sum") / max(scores.shape[0], 1)

        w = used.to(probs.dtype)[..., None, None]  # [B, M, 1, 1]
        avg_probs = (probs * w).sum((0, 1)) / w.sum().clamp(min=1)  # [G, V]
        prob_ppl = perplexity(avg_probs)
        gv = self.num_codebooks * self.codebook_size
        diversity = (gv - prob_ppl) / gv
        loss = ce + self.diversity_weight * diversity + self.feature_penalty * pen
        metrics = self._metrics(ce, diversity, prob_ppl, pen, scores, codes[used])
        embedding = pool_valid(ctx, valid).detach()  # [B, D]
        return LossOutput(loss=loss, metrics=metrics, embedding=embedding)

    @torch.no_grad()
    def _metrics(
        self, ce: Tensor, diversity: Tensor, prob_ppl: Tensor, pen: Tensor, scores: Tensor, codes: Tensor
    ) -> dict[str, float]:
        """Scalars to log; codes [T, G] are the hard codes of the valid masked frames."""
        hist = F.one_hot(codes, self.codebook_size).sum(0).float()  # [G, V]
        code_ppl = perplexity(hist / hist.sum(-1, keepdim=True).clamp(min=1))
        correct = scores[:, 0] > scores[:, 1:].max(-1).values if scores.shape[1] > 1 else scores[:, 0] > 0
        return {
            "contrastive": float(ce),
            "diversity": float(diversity),
            "prob_perplexity": float(prob_ppl),
            "code_perplexity": float(code_ppl),
            "codes_used": float((hist > 0).sum(-1).float().mean()),  # distinct entries per codebook
            "targets_distinct": float(torch.unique(codes, dim=0).shape[0]) if codes.numel() else 0.0,
            "feature_penalty": float(pen),
            "gumbel_temp": float(self.gumbel_temp),
            "accuracy": float(correct.float().mean()) if scores.shape[0] else 0.0,
            "targets": float(scores.shape[0]),
        }

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: no decay on biases, norms and the mask embedding."""
        return split_decay(list(self.named_parameters()), weight_decay)

    def after_step(self, step: int, total_steps: int) -> None:
        """Anneal the Gumbel temperature: max(max_t * decay**step, min_t)."""
        self.gumbel_temp.fill_(max(self.max_temp * self.temp_decay**step, self.min_temp))

    def encoder(self) -> nn.Module:
        """The backbone itself: forward(wave [B, S], length [B]) → [B, D]."""
        return self.backbone

    def encoder_spec(self) -> dict[str, Any]:
        """How to rebuild `encoder()`: make_backbone(spec["backbone"], **spec["backbone_args"])."""
        return {"backbone": self.backbone_name, "backbone_args": dict(self.backbone_args)}

    def mask_spec(self) -> dict[str, Any]:
        """Span masks over conv-encoder frames, as the pipeline draws them."""
        return {
            "kind": "span",
            "ratio": self.mask_ratio,
            "mask_prob": self.mask_prob,
            "mask_length": self.mask_length,
            "geometry": {"conv_layers": [list(layer) for layer in self.backbone.conv_layers]},
        }


def _check_args(
    modality: str, gumbel_temp: Sequence[float], num_negatives: int, vq_dim: int, num_codebooks: int
) -> None:
    """ValueErrors naming the bad argument."""
    if modality != "audio":
        raise ValueError(f"wav2vec2 trains on raw audio, got modality={modality!r}; use modality='audio' with wave batches")
    if len(gumbel_temp) != 3:
        raise ValueError(f"gumbel_temp must be (max, min, decay), got {tuple(gumbel_temp)!r}")
    if num_negatives < 1:
        raise ValueError(f"num_negatives={num_negatives} must be >= 1")
    if vq_dim % num_codebooks:
        raise ValueError(f"codebook dim {vq_dim} is not divisible by num_codebooks={num_codebooks}")
