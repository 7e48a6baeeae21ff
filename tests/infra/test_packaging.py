"""The distribution installs one import name, `selfsup`, mapping the top-level folders under it; a wheel
built from the checkout and installed elsewhere runs without it."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

from tests.conftest import FMNIST, Installed

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


def test_wheel_holds_every_module_and_config_under_selfsup_only(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
    assert {n.split("/")[0] for n in names} == {"selfsup", info}, "the wheel installs another top-level name"
    want = set()
    for name, folder in FOLDERS.items():
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and (path.suffix == ".py" or path.suffix == ".yaml" and "configs" in path.parts):
                want.add("/".join((*name.split("."), *path.relative_to(ROOT / folder).parts)))
    assert any(n.startswith("selfsup/jobs/configs/quality/") for n in want)
    assert want <= names, sorted(want - names)
    with zipfile.ZipFile(installed.wheel) as z:
        assert z.read(f"{info}/top_level.txt").decode().split() == ["selfsup"]
        assert "selfsup = selfsup.jobs.cli:console" in z.read(f"{info}/entry_points.txt").decode()


def test_installed_copy_runs_from_another_folder(installed: Installed, tmp_path: Path) -> None:
    """The console script, package data (configs) and registries of the installed copy, then real shards."""
    script = installed.site / "bin" / "selfsup"
    res = installed.run(str(script), "--help", cwd=tmp_path)
    assert res.returncode == 0 and "usage: selfsup" in res.stdout, res.stderr[-2000:]
    code = ("import selfsup.jobs.cli as cli, selfsup.jobs.commands.demo as demo\n"
            "from selfsup.pipeline.config import load_config\n"
            "from selfsup.pipeline.modalities import MODALITIES\n"
            "from selfsup.trainers.config import PretrainConfig, validate\n"
            "from selfsup.trainers.objectives import OBJECTIVES\n"
            "print(cli.__file__); print(demo.CONFIGS)\n"
            "for path in sorted(demo.CONFIGS.rglob('*.yaml')):\n"
            "    cfg = validate(load_config(PretrainConfig, str(path)))\n"
            "    assert cfg.objective.name in OBJECTIVES and cfg.data.modality in MODALITIES, path\n"
            "    print(path.relative_to(demo.CONFIGS))\n")
    res = installed.run("-c", code, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    cli_file, configs, *loaded = res.stdout.split()
    assert Path(cli_file) == installed.site / "selfsup" / "jobs" / "cli.py"
    assert Path(configs) == installed.site / "selfsup" / "jobs" / "configs"
    assert sorted(loaded) == sorted(str(p.relative_to(ROOT / "jobs" / "configs"))
                                    for p in (ROOT / "jobs" / "configs").rglob("*.yaml"))
    write = installed.run(str(script), "shards", "write", str(FMNIST), "ds", "--modality", "image", "--limit", "20",
                          "--samples-per-shard", "10", "--workers", "1", "--quiet", cwd=tmp_path)
    assert write.returncode == 0, write.stderr[-3000:]
    ls = installed.run(str(script), "shards", "ls", "ds", cwd=tmp_path)
    assert ls.returncode == 0, ls.stderr[-3000:]
    assert len(list((tmp_path / "ds").glob("pretrain-*.tar"))) == 2
    total = next(line for line in ls.stdout.splitlines() if line.startswith("image "))
    assert total.split()[1:4] == ["pretrain", "2", "20"], ls.stdout


def test_a_checkout_on_the_path_is_whole_beside_an_installed_copy(installed: Installed) -> None:
    """A job's working_dir or a container's WORKDIR puts a checkout first on sys.path: its `selfsup/` folder
    must bring its subpackages along (from the checkout's root), not shadow the installed copy with a stub."""
    code = "import selfsup.jobs.cli, selfsup.trainers.loop as m; print(m.__file__)"
    res = installed.run("-c", code, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert Path(res.stdout.strip()) == ROOT / "trainers" / "loop.py"
    bare = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]})
    assert bare.returncode == 0, bare.stderr[-3000:]  # no install at all: the checkout alone
