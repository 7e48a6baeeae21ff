"""`backbone: timm:<name>`: any timm image model as the encoder, its classifier removed.

    objective: {backbone: "timm:resnet18", backbone_args: {in_channels: 1}}
    objective: {backbone: "timm:vit_small_patch16_224", backbone_args: {img_size: 64, weights: /models/vit_s.safetensors}}

Nothing downloads: the model is built with `pretrained=False`; `weights` names a local (or storage URL)
file of timm-named weights (`.safetensors`, else a torch file loaded with weights_only=True) that
initialises it. Every other argument goes to `timm.create_model` (`in_channels` as timm's `in_chans`).
The encoder's weights are timm's own under `net.`, so `selfsup export --format timm` only strips that.
"""
from __future__ import annotations

import difflib
import io
from typing import Any, Callable, Mapping, Optional

import timm
import torch
from torch import nn

from selfsup.pipeline import storage
from selfsup.trainers.backbones import FAMILIES

FAMILY = "timm"


class TimmBackbone(nn.Module):
    """A timm model without its classifier: images [B, C, H, W] → pooled features [B, out_dim]."""

    def __init__(self, net: nn.Module, model: str) -> None:
        super().__init__()
        self.net = net
        self.model = model
        self.out_dim = int(getattr(net, "num_features"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features [B, out_dim]."""
        if x.ndim != 4:
            raise ValueError(f"timm:{self.model} takes images [B, C, H, W]; got shape {tuple(x.shape)} "
                             "(timm models are image models: use a selfsup backbone for audio and video)")
        return self.net(x)  # [B, out_dim]


def check_model_name(model: str) -> None:
    """Refuse a name timm does not know, naming the closest ones it does."""
    if model and timm.is_model(model):
        return
    close = difflib.get_close_matches(model, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; close: {', '.join(close)}" if close else ""
    raise ValueError(f"unknown timm model {model!r}{hint}; timm.list_models('resnet*') lists the names "
                     f"(timm {timm.__version__})")


def read_weights(url: str) -> dict[str, torch.Tensor]:
    """A state dict from a `.safetensors` file or a torch file (weights_only=True), at any storage URL."""
    data = storage.read_bytes(url)
    try:
        if url.endswith(".safetensors"):
            from safetensors.torch import load

            state: Any = load(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - both libraries raise many types for damaged files
        raise ValueError(f"backbone_args.weights={storage.redact_url(url)} is not a readable weights file "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
    for key in ("state_dict", "model"):  # training checkpoints often nest the weights
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"backbone_args.weights={storage.redact_url(url)} holds no state dict of tensors")
    return dict(state)


def load_weights(net: nn.Module, url: str) -> None:
    """Load timm-named weights into `net`, strictly, leaving out the file's classifier (the model has none)."""
    head = getattr(net, "pretrained_cfg", {}).get("classifier") or ()
    heads = (head,) if isinstance(head, str) else tuple(head)
    state = {k: v for k, v in read_weights(url).items() if not any(k.startswith(h + ".") for h in heads)}
    own = net.state_dict()
    problems = [("missing", [k for k in own if k not in state]), ("unexpected", [k for k in state if k not in own]),
                ("shape", [f"{k} {list(v.shape)}≠{list(own[k].shape)}" for k, v in state.items()
                           if k in own and v.shape != own[k].shape])]
    found = [f"{kind}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}" for kind, keys in problems if keys]
    if found:
        raise ValueError(f"backbone_args.weights={storage.redact_url(url)} does not fit timm model "
                         f"{type(net).__name__} ({'; '.join(found)}); give weights of the same architecture")
    net.load_state_dict(state, strict=True)


def timm_builder(model: str) -> Callable[..., nn.Module]:
    """The builder of `timm:<model>` (checked against timm's registry first)."""
    check_model_name(model)

    def build(in_channels: int = 3, weights: Optional[str] = None, **model_args: Any) -> TimmBackbone:
        try:
            net = timm.create_model(model, pretrained=False, num_classes=0, in_chans=in_channels, **model_args)
        except TypeError as e:  # an argument the model does not take: say where it came from
            raise TypeError(f"timm model {model} refused backbone_args {sorted(model_args)} ({e}); "
                            "backbone_args other than in_channels and weights go to timm.create_model") from None
        # check_backbone builds on the meta device to count parameters: no file is read there
        if weights and not torch.empty(0).is_meta:
            load_weights(net, weights)
        return TimmBackbone(net, model)

    build.__name__ = f"timm_{model}"
    build.__doc__ = f"timm model {model} without its classifier (pretrained=False; `weights`: a local file)."
    return build


FAMILIES.register(FAMILY)(timm_builder)
