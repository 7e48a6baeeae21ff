"""Backbones (encoders), registered by name. Importing this package registers every one of them.

Every backbone is an nn.Module with an integer attribute `out_dim` whose forward maps the
modality's normalized input to features [B, out_dim] (see trainers/objectives/base.py for the
input shapes). Token-based encoders (ViTs) also expose the pieces MAE needs.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from selfsup.pipeline.registry import Registry

BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone")
# Families of backbones named `<family>:<model>` (`timm:resnet18`): family → (model name → builder).
FAMILIES: Registry[Callable[[str], Callable[..., nn.Module]]] = Registry("backbone family")
# Arguments that only initialise a new model (a weights file): a checkpoint's own weights replace them,
# so a model rebuilt from a checkpoint's meta.json never reads them.
INIT_ONLY_ARGS = ("weights",)
MAX_PARAMETERS = 2 * 10**9  # parameters and buffers a backbone may hold (8 GB of float32; ViT-g has 1.0e9)
MAX_ARG_VALUE = 2**16       # any number in backbone_args: widths, sizes, patch and kernel sizes
MAX_LAYERS = 256            # an argument counting layers: each costs Python objects and time to build
LAYER_ARGS = ("depth", "num_layers")


def arg_numbers(value: Any, path: str) -> Iterator[tuple[str, float]]:
    """(dotted path, number) of every number inside a JSON-like value (bools are not numbers)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, value
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from arg_numbers(v, f"{path}[{i}]")
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from arg_numbers(v, f"{path}.{k}")


def prefixed(where: str, message: str) -> str:
    """`message` prefixed by the file or setting it is about, when there is one."""
    return f"{where}: {message}" if where else message


def backbone_builder(name: str) -> Callable[..., nn.Module]:
    """The builder of backbone `name`: a registered name, or `<family>:<model>` of a family (`timm:resnet18`)."""
    family, sep, model = name.partition(":")
    if not sep:
        try:
            return BACKBONES.get(name)
        except ValueError as e:
            raise ValueError(f"{e}; or a family's model: {', '.join(f + ':<name>' for f in FAMILIES)}") from None
    return FAMILIES.get(family)(model)


def check_backbone(name: str, args: Mapping[str, Any], where: str = "") -> None:
    """Refuse, before anything is allocated, a backbone unknown or too large to build.

    Every number in `args` must be finite and at most MAX_ARG_VALUE, a layer count at most MAX_LAYERS, and
    the model, built first on the meta device (shapes only, no memory), at most MAX_PARAMETERS. Errors
    (ValueError, or the backbone's own TypeError for an unknown argument) name `where` and the field.
    """
    try:
        build = backbone_builder(name)
    except ValueError as e:
        raise ValueError(prefixed(where, str(e))) from None
    for path, value in arg_numbers(dict(args), "backbone_args"):
        if not math.isfinite(value) or abs(value) > MAX_ARG_VALUE:
            raise ValueError(prefixed(where, f"{path}={value!r}: a backbone argument must be a finite number "
                                             f"of at most {MAX_ARG_VALUE}"))
    for key in LAYER_ARGS:
        if isinstance(args.get(key), (int, float)) and args[key] > MAX_LAYERS:
            raise ValueError(prefixed(where, f"backbone_args.{key}={args[key]!r} is over the limit of "
                                             f"{MAX_LAYERS} layers"))
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = build(**args)
    except (TypeError, ValueError) as e:  # the backbone's own argument checks: named after the file they came from
        if not where:
            raise
        raise type(e)(prefixed(where, str(e))) from None
    tensors = [*model.named_parameters(), *model.named_buffers()]
    total = sum(t.numel() for _, t in tensors)
    if total > MAX_PARAMETERS:
        big, t = max(tensors, key=lambda nt: nt[1].numel())
        raise ValueError(prefixed(where, f"backbone {name!r} with backbone_args {dict(args)} would hold {total:,} "
                                         f"parameters and buffers (the largest: {big} {list(t.shape)}), over the "
                                         f"limit of {MAX_PARAMETERS:,}"))


def make_backbone(name: str, **args: Any) -> nn.Module:
    """Build the backbone registered as `name` from its keyword arguments, once `check_backbone` passes."""
    check_backbone(name, args)
    return backbone_builder(name)(**args)


def backbone_from_spec(spec: Mapping[str, Any], where: str = "") -> nn.Module:
    """Rebuild a backbone from an objective's `encoder_spec()` ({"backbone", "backbone_args"}).

    `where` (a checkpoint's meta.json) starts every error message, as the spec may come from a file.
    INIT_ONLY_ARGS are left out: the weights come from the checkpoint (or stay a random init).
    """
    name, args = spec.get("backbone"), spec.get("backbone_args") or {}
    if not isinstance(name, str) or not isinstance(args, Mapping):
        raise ValueError(prefixed(where, f"backbone must be a name and backbone_args an object, got {name!r} "
                                         f"and {type(args).__name__}"))
    args = {k: v for k, v in args.items() if k not in INIT_ONLY_ARGS}
    check_backbone(name, args, where)
    return backbone_builder(name)(**args)


from selfsup.trainers.backbones import cnn, resnet, vit, audio, video, wav2vec2, timm_models, timm_layout  # noqa: E402,F401,E501

__all__ = ["BACKBONES", "FAMILIES", "MAX_PARAMETERS", "backbone_builder", "backbone_from_spec", "check_backbone",
           "make_backbone"]
