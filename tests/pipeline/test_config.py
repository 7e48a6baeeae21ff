"""Config: YAML values, dotted overrides, unknown keys rejected, secrets never written."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import pytest

from selfsup.pipeline.config import ConfigError, load_config, parse_override, to_dict, to_yaml


@dataclass(frozen=True)
class Train:
    lr: float = 1e-3
    steps: int = 10
    betas: tuple[float, float] = (0.9, 0.999)
    optimizer: str = "adamw"


@dataclass(frozen=True)
class Storage:
    endpoint_url: Optional[str] = None
    key: Optional[str] = None
    secret: Optional[str] = None


@dataclass(frozen=True)
class Cfg:
    name: str = "run"
    train: Train = field(default_factory=Train)
    storage: Storage = field(default_factory=Storage)
    tags: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Objective:
    name: str = "simclr"
    args: dict[str, Any] = field(default_factory=dict)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: a\ntrain:\n  lr: 0.1\n  steps: 5\ntags: [x]\n")
    cfg = load_config(Cfg, str(path), ["train.lr=3e-4", "train.betas=[0.5, 0.6]", "tags=[y, z]"])
    assert cfg.name == "a"
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.steps == 5
    assert cfg.train.betas == (0.5, 0.6)
    assert cfg.tags == ["y", "z"]
    assert cfg.train.optimizer == "adamw"


def test_nested_mappings_merge_and_an_empty_one_clears(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("args: {width: 32, in_channels: 1}\n")
    assert load_config(Objective, str(path), ["args.width=8"]).args == {"width": 8, "in_channels": 1}
    assert load_config(Objective, str(path), ["args={depth: 2}"]).args == {"width": 32, "in_channels": 1, "depth": 2}
    assert load_config(Objective, str(path), ["args={}"]).args == {}


def test_unknown_keys_are_rejected_with_valid_ones_listed(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lrr.*valid keys: betas, lr, optimizer, steps"):
        load_config(Cfg, None, ["train.lrr=1"])
    path = tmp_path / "c.yaml"
    path.write_text("nmae: typo\n")
    with pytest.raises(ConfigError, match="nmae.*valid keys: name, storage, tags, train"):
        load_config(Cfg, str(path))


def test_type_errors_name_the_key():
    with pytest.raises(ConfigError, match="train.steps must be an integer"):
        load_config(Cfg, None, ["train.steps=many"])
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        parse_override("train.lr")


def test_resolved_config_has_no_secrets():
    cfg = load_config(Cfg, None, ["storage.key=AKIASECRET", "storage.secret=hunter2",
                                  "storage.endpoint_url=http://127.0.0.1:9"])
    text = to_yaml(cfg)
    assert "AKIASECRET" not in text and "hunter2" not in text
    assert "endpoint_url: http://127.0.0.1:9" in text
    assert to_dict(cfg, secrets=True)["storage"]["secret"] == "hunter2"


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(Cfg, str(tmp_path / "nope.yaml"))
