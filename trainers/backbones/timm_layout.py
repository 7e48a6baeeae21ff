"""Our encoders' weights in timm's layout: names and `timm.create_model` arguments that take them strictly.

    layout = timm_layout(encoder, "vit_micro", backbone_args, modality)
    net = timm.create_model(layout.architecture, pretrained=False, num_classes=0, **layout.model_args)
    net.load_state_dict(layout.state_dict, strict=True)     # net(x) == encoder(x)

ResNets keep torchvision's names, which timm's ResNet shares (torchvision's `resnet18()` with
`fc = nn.Identity()` takes them too). Our ViT (kept for MAE's masked-token path) maps onto timm's
VisionTransformer without class token, mean-pooled, final norm before the pool, and its fixed
sine-cosine positions stored as timm's `pos_embed`. `timm:<name>` backbones are timm's own model.
Architectures timm cannot build (a 3×3 stem without max-pool, resnet18_narrow's widths (timm's stem is
always 64 wide), ViTs over video or spectrograms, our CNNs, wav2vec 2.0) raise a ValueError that says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from selfsup.pipeline.registry import Registry
from selfsup.trainers.backbones import INIT_ONLY_ARGS

# timm's named ViT of each of our sizes (vit_micro has none: tiny's with its dims overridden)
VIT_ARCHITECTURES = {"vit_micro": "vit_tiny_patch16_224", "vit_tiny": "vit_tiny_patch16_224",
                     "vit_small": "vit_small_patch16_224", "vit_base": "vit_base_patch16_224"}
OTHER_FORMATS = "export it as safetensors, torchscript or onnx instead"


@dataclass(frozen=True)
class TimmLayout:
    """What `timm.create_model(architecture, pretrained=False, num_classes=0, **model_args)` loads strictly."""

    architecture: str
    model_args: dict[str, Any]
    state_dict: dict[str, torch.Tensor]


LayoutFn = Callable[[nn.Module, str, Mapping[str, Any], str], TimmLayout]
TIMM_LAYOUTS: Registry[LayoutFn] = Registry("timm layout")


def timm_layout(encoder: nn.Module, backbone: str, backbone_args: Mapping[str, Any], modality: str) -> TimmLayout:
    """The encoder's weights under timm's names with the arguments that build the same model in timm."""
    family, sep, _ = backbone.partition(":")
    key = family if sep else backbone
    if key not in TIMM_LAYOUTS:
        raise ValueError(f"timm cannot take backbone {backbone!r}: timm has no model of its architecture "
                         f"(the timm format covers {', '.join(n for n in TIMM_LAYOUTS.names() if n != 'timm')}, timm:<name>); "
                         f"{OTHER_FORMATS}")
    return TIMM_LAYOUTS.get(key)(encoder, backbone, backbone_args, modality)


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The state dict with `prefix` taken off every name."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def refuse_small_input(backbone: str, small_input: bool) -> None:
    """timm's ResNet always has the 7×7/2 stem and its max-pool."""
    if small_input:
        raise ValueError(f"timm cannot take {backbone} with small_input=true: timm's ResNet has no 3×3/1 stem "
                         f"without max-pool; {OTHER_FORMATS}")


def resnet_layout(encoder: nn.Module, backbone: str, args: Mapping[str, Any], modality: str) -> TimmLayout:
    """resnet18 / resnet50: timm's model of the same name; torchvision's names under `net.`."""
    refuse_small_input(backbone, bool(args.get("small_input", False)))
    return TimmLayout(backbone, {"in_chans": int(args.get("in_channels", 3))},
                      strip_prefix(encoder.state_dict(), "net."))


def vit_layout(encoder: nn.Module, backbone: str, args: Mapping[str, Any], modality: str) -> TimmLayout:
    """Our image ViT → timm VisionTransformer (no class token, avg pool, norm before the pool)."""
    if modality != "image" or args.get("modality", "image") != "image":
        raise ValueError(f"timm cannot take {backbone} over {args.get('modality', modality)} tokens: timm's "
                         f"VisionTransformer takes image patches only; {OTHER_FORMATS}")
    tok = getattr(encoder, "tokenizer")
    blocks = getattr(encoder, "blocks")
    in_chans, h, w = tok.in_shape
    model_args = {"img_size": [h, w], "patch_size": tok.patch, "in_chans": in_chans, "embed_dim": encoder.out_dim,
                  "depth": len(blocks), "num_heads": blocks[0].attn.num_heads,
                  "mlp_ratio": float(args.get("mlp_ratio", 4.0)), "class_token": False, "global_pool": "avg",
                  "fc_norm": False}
    state = {("patch_embed." + k[len("tokenizer."):] if k.startswith("tokenizer.") else k): v
             for k, v in encoder.state_dict().items()}
    state["pos_embed"] = getattr(encoder, "pos_embed").detach().clone()  # [1, N, D], fixed sin-cos
    return TimmLayout(VIT_ARCHITECTURES[backbone], model_args, state)


def timm_family_layout(encoder: nn.Module, backbone: str, args: Mapping[str, Any], modality: str) -> TimmLayout:
    """timm:<name>: timm's own model under `net.`; its arguments as given (a weights file aside)."""
    model_args = {k: v for k, v in args.items() if k not in INIT_ONLY_ARGS and k != "in_channels"}
    model_args["in_chans"] = int(args.get("in_channels", 3))
    return TimmLayout(backbone.partition(":")[2], model_args, strip_prefix(encoder.state_dict(), "net."))


for _name in ("resnet18", "resnet50"):
    TIMM_LAYOUTS.register(_name)(resnet_layout)
for _name in VIT_ARCHITECTURES:
    TIMM_LAYOUTS.register(_name)(vit_layout)
TIMM_LAYOUTS.register("timm")(timm_family_layout)
