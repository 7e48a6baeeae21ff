"""PretrainConfig, the schema of every run: frozen all the way down."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any

import pytest

from selfsup.pipeline.config import load_config
from selfsup.trainers.config import PretrainConfig
from tests.conftest import ROOT


def test_pretrain_config_is_frozen_at_every_level():
    """Every section of PretrainConfig, down to each data source, refuses assignment once loaded."""
    cfg = load_config(PretrainConfig, str(ROOT / "jobs" / "configs" / "simclr_image.yaml"),
                      ["data.sources=[{url: a}, {url: b, split: probe-train}]"])
    seen: set[type] = set()

    def walk(obj: Any, where: str) -> None:
        assert dataclasses.is_dataclass(obj) and type(obj).__dataclass_params__.frozen, f"{where} is not frozen"
        seen.add(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(obj, f.name, value)
            items = value if isinstance(value, (list, tuple)) else [value]
            for i, item in enumerate(items):
                if dataclasses.is_dataclass(item):
                    walk(item, f"{where}.{f.name}" + (f"[{i}]" if items is value else ""))

    walk(cfg, "PretrainConfig")
    # every dataclass the schema names was reached, so none escapes the check
    schema: set[type] = set()
    todo: list[Any] = [PretrainConfig]
    while todo:
        tp = todo.pop()
        todo += typing.get_args(tp)  # list[X], Optional[X], dict[str, X] ...
        if dataclasses.is_dataclass(tp) and isinstance(tp, type) and tp not in schema:
            schema.add(tp)
            todo += typing.get_type_hints(tp).values()
    assert schema == seen, sorted(t.__name__ for t in schema ^ seen)


def test_data_sources_load_as_snapshot_source_specs():
    """`data.sources` entries are the SourceSpec that build_snapshot takes, with its defaults."""
    from selfsup.pipeline.snapshot import SourceSpec

    cfg = load_config(PretrainConfig, overrides=["data.sources=[{url: s3://b/a, weight: 2}, {url: b, split: probe-train}]"])
    assert cfg.data.sources == [SourceSpec("s3://b/a", "pretrain", 2.0, ""), SourceSpec("b", "probe-train")]
    assert isinstance(cfg.data.sources[0].weight, float) and cfg.data.sources[1].label == "b#probe-train"
