"""Truth in packaging: every floor in pyproject.toml is the version a named feature needs, no floor is
above the tested pins (constraints.txt), `requires-python` admits no interpreter the pins refuse,
and constraints.txt pins only what the stack installs."""
from __future__ import annotations

import importlib.metadata as md
import inspect
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]

# distribution → (floor, the feature that needs it). A new floor needs a row here, and a row its floor.
FLOORS = {
    "ray": ("2.52", "token authentication (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN[_PATH], `ray get-auth-token`), which "
                    "`selfsup submit`/`jobs` and infra/ use: first in Ray 2.52.0 (docs.ray.io, ray-security/token-auth)"),
    "botocore": ("1.35.69", "conditional S3 writes through s3fs: PutObject IfNoneMatch (manifest parts, leases) and "
                            "IfMatch (lease renewals, promoted.json); IfMatch is first in botocore 1.35.69's S3 model "
                            "(1.35.68 has IfNoneMatch only)"),
    "webdataset": ("0.2.96", "TarWriter(encoder=False, mtime=, user=, group=) for byte-stable shards (present in "
                             "0.2.86 and 0.2.96; the former floor 0.2.90 was never released)"),
    "torch": ("2.4", "kept, not lowered: what selfsup uses needs at most 2.1 (weight_norm parametrizations, whose "
                     "state-dict names checkpoints carry; scaled_dot_product_attention 2.0), but nothing below 2.4 "
                     "was ever run"),
}
PYTHON_FLOOR = "3.11"  # the pins: numpy 2.4, scipy 1.17, pandas 3, … declare Requires-Python >= 3.11


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pins() -> dict[str, Version]:
    """constraints.txt as {normalized name: version}."""
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            out[normalize(name)] = Version(version)
    return out


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def floors() -> dict[str, Version]:
    """The `>=` floor of each runtime dependency of pyproject.toml that has one."""
    out = {}
    for text in project()["dependencies"]:
        req = Requirement(text)
        for spec in req.specifier:
            assert spec.operator in (">=", "=="), f"{text}: use a floor (>=), not {spec.operator}"
            if spec.operator == ">=":
                out[normalize(req.name)] = Version(spec.version)
    return out


def test_every_floor_is_the_version_its_feature_needs() -> None:
    assert floors() == {name: Version(v) for name, (v, _) in FLOORS.items()}


def test_no_floor_is_above_the_tested_pins() -> None:
    tested = pins()
    above = {name: (str(floor), str(tested.get(name))) for name, floor in floors().items()
             if name not in tested or floor > tested[name]}
    assert not above, f"floors above (or missing from) constraints.txt: {above}"


def test_requires_python_admits_nothing_the_pins_refuse() -> None:
    assert project()["requires-python"] == f">={PYTHON_FLOOR}"
    refusing = {}
    for name, version in pins().items():
        try:
            needs = md.metadata(name).get("Requires-Python")
        except md.PackageNotFoundError:
            continue  # checked by the next test
        if needs and not SpecifierSet(needs).contains(PYTHON_FLOOR):
            refusing[f"{name}=={version}"] = needs
    assert not refusing, f"requires-python >={PYTHON_FLOOR} admits interpreters these pins refuse: {refusing}"
    assert Version(PYTHON_FLOOR) <= Version(f"{sys.version_info.major}.{sys.version_info.minor}")
    readme = (ROOT / "README.md").read_text()
    assert f"Python {PYTHON_FLOOR}+" in readme and not re.search(r"Python 3\.(?!11)\d+\+", readme)


def test_constraints_pin_only_installed_distributions() -> None:
    """Every pin is installed here (the venv is built from them), so a pin that nothing requires shows up."""
    missing = []
    for name, version in pins().items():
        try:
            if Version(md.version(name)) != version:
                missing.append(f"{name}=={version} (installed {md.version(name)})")
        except md.PackageNotFoundError:
            missing.append(f"{name}=={version} (not installed)")
    assert not missing, missing


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_the_pinned_version_has_the_feature_its_floor_names(name: str) -> None:
    """The features the table names exist in the tested stack (the floors themselves were read from
    release notes and wheels: see FLOORS)."""
    if name == "ray":
        from ray.scripts.scripts import cli

        assert "get-auth-token" in cli.commands  # the command README and infra/ tell users to run
    elif name == "botocore":
        import botocore.session

        shape = botocore.session.get_session().get_service_model("s3").operation_model("PutObject").input_shape
        assert {"IfMatch", "IfNoneMatch"} <= set(shape.members)
    elif name == "webdataset":
        import webdataset

        assert {"mtime", "user", "group", "encoder"} <= set(inspect.signature(webdataset.TarWriter).parameters)
    elif name == "torch":
        import torch

        conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv1d(2, 2, 3), dim=2)
        assert {"parametrizations.weight.original0", "parametrizations.weight.original1"} <= set(conv.state_dict())
