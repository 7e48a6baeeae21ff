"""The distribution installs one import name, `selfsup`, mapping the top-level folders under it."""
from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"selfsup": "selfsup", "selfsup.pipeline": "pipeline", "selfsup.trainers": "trainers", "selfsup.jobs": "jobs"}
BARE = ("pipeline", "trainers", "jobs")


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed_under_selfsup() -> None:
    tool = pyproject()["tool"]["setuptools"]
    assert tool["package-dir"] == FOLDERS
    found = set()
    for name, folder in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *rel)))
    assert sorted(tool["packages"]) == sorted(found), "pyproject's packages list and the package folders differ"


def test_no_module_imports_a_bare_top_level_name() -> None:
    offenders = []
    for folder in ("selfsup", "pipeline", "trainers", "jobs", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                              if n.split(".")[0] in BARE]
    assert not offenders, "import selfsup.<package> instead: " + ", ".join(offenders)


def test_public_api_resolves_lazily() -> None:
    code = ("import sys, selfsup; assert 'torch' not in sys.modules, 'import selfsup pulled in torch'; "
            "[getattr(selfsup, n) for n in selfsup.__all__]; print(len(selfsup.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout) >= 10
