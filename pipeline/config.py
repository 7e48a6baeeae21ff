"""Config: frozen dataclasses are the schema, YAML holds values, `a.b=value` overrides win.

    cfg = load_config(PretrainConfig, "jobs/configs/simclr_image.yaml", ["train.lr=3e-4"])

Unknown keys raise with the valid ones listed; values are checked against the field types;
`to_dict(cfg, secrets=False)` gives a resolved config safe to write next to checkpoints.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping, Optional, Sequence, TypeVar, Union

import yaml

from selfsup.pipeline.storage import is_secret_name, read_text, redact_text

C = TypeVar("C")


class ConfigError(ValueError):
    """A config value or key that does not fit the schema."""


def load_config(schema: type[C], path: Optional[str] = None, overrides: Sequence[str] = (),
                base: Optional[Mapping[str, Any]] = None, options: Optional[Mapping[str, Any]] = None) -> C:
    """Build `schema` from an optional YAML file (local or URL; `options` for its store), then apply overrides."""
    values: dict[str, Any] = dict(base or {})
    if path:
        try:
            text = read_text(path, options)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {path} does not exist") from None
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
        values = merge(values, loaded)
    for item in overrides:
        values = merge(values, parse_override(item))
    return from_dict(schema, values)


def parse_override(item: str) -> dict[str, Any]:
    """`train.lr=3e-4` → {"train": {"lr": 0.0003}} (the value is parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key part")
    value: Any = yaml.safe_load(raw) if raw != "" else ""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive merge: mappings merge key by key, everything else is replaced.

    An empty mapping replaces too, so `objective.backbone_args={}` clears the YAML's arguments.
    """
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and v and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def from_dict(schema: type[C], values: Mapping[str, Any], where: str = "") -> C:
    """Instantiate a (nested) frozen dataclass from a mapping, rejecting unknown keys."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(schema)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        label = f"in {where}" if where else "at the top level"
        raise ConfigError(f"unknown config key(s) {', '.join(where + '.' + k if where else k for k in unknown)} "
                          f"{label}; valid keys: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(schema)
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
    try:
        return schema(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, where)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if tp is Any:
        return value
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where} must have {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if typing.get_origin(tp) is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    return value


def to_dict(cfg: Any, secrets: bool = False) -> dict[str, Any]:
    """The config as plain data; unless `secrets`, credential-named values are dropped (at any depth)
    and credential-shaped strings masked (`sftp://u:***@host`, `AKIA…`, `Bearer …`)."""
    data = dataclasses.asdict(cfg)
    return data if secrets else _strip_secrets(data)


def _strip_secrets(value: Any) -> Any:
    """Drop credential-named entries at any depth; mask credential-shaped strings (URL passwords, keys)."""
    if isinstance(value, Mapping):
        return {k: _strip_secrets(v) for k, v in value.items() if not is_secret_name(str(k))}
    if isinstance(value, (list, tuple)):
        return type(value)(_strip_secrets(v) for v in value)
    if isinstance(value, str):
        return redact_text(value)
    return value


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML, without secrets."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
