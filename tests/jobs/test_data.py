"""Finding data as `make demo` does, and the test suite's skip of a test whose data set is missing."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from selfsup.jobs.cluster.submit import stage_working_dir
from selfsup.jobs.data import data_roots, find_dataset
from tests.conftest import FMNIST, ROOT


def test_data_is_looked_up_in_the_order_the_readme_gives(tmp_path, monkeypatch):
    given, env = tmp_path / "given", tmp_path / "env"
    for root in (given, env):
        (root / "fashion-mnist").mkdir(parents=True)
        (root / "fashion-mnist" / "t10k-images-idx3-ubyte.gz").symlink_to(FMNIST / "t10k-images-idx3-ubyte.gz")
    monkeypatch.setenv("SELFSUP_DATA", str(env))
    roots = data_roots(str(given))
    assert roots[:3] == [given, env, Path("/usr/share/datasets")], roots
    assert ROOT.parent / "shared" / "datasets" in roots[3:]
    assert find_dataset("fashion-mnist", str(given)) == given / "fashion-mnist"
    assert find_dataset("fashion-mnist") == env / "fashion-mnist"
    assert find_dataset("fashion-mnist", str(given / "fashion-mnist")) == given / "fashion-mnist"  # the set itself


def test_a_test_reaching_a_missing_data_set_is_skipped_with_one_line(tmp_path):
    """The suite, away from ../shared/datasets, given only Fashion-MNIST with --data: a test on FSDD
    is skipped naming FSDD and how to get it; a test without data and one on Fashion-MNIST run."""
    source, data = tmp_path / "checkout", tmp_path / "data"
    source.mkdir(), data.mkdir()
    stage_working_dir(source, None, ROOT)  # the packages as installed: their ../shared is not this one's
    shutil.copytree(ROOT / "tests", source / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    (data / "fashion-mnist").symlink_to(FMNIST)
    tests = ["tests/pipeline/test_audio.py::test_bad_config_raises",
             "tests/pipeline/test_audio.py::test_speech_views_of_a_spoken_digit",
             "tests/pipeline/sources/test_moving_fashion_mnist.py::test_source_items_are_reproducible_and_encode_"
             "labelled_clips"]
    res = subprocess.run([sys.executable, "-S", "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--data",
                          str(data), *tests], cwd=source, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"], "SELFSUP_DATA": ""})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "2 passed, 1 skipped" in res.stdout, res.stdout[-3000:]
    (line,) = [ln for ln in res.stdout.splitlines() if ln.startswith("SKIPPED")]
    print(line)
    assert "test_audio.py" in line and f"skipping fsdd: not found under {data}, /usr/share/datasets" in line
    assert "to get it: `git clone https://github.com/Jakobovski/free-spoken-digit-dataset`" in line
