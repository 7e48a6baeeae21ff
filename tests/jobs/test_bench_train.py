"""`selfsup bench train` on CPU with local-process streams, and `make gpu-check` without a GPU: both
run with Ray made unimportable (the GPU machine has no Ray), as a fresh interpreter would."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from selfsup.jobs.cli import main
from tests.conftest import FMNIST, ROOT

# a fresh interpreter in which `import ray` fails, as on the GPU machine
NO_RAY = """
import importlib.abc, runpy, sys
class NoRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "ray":
            raise ModuleNotFoundError("No module named 'ray' (made unimportable by the test)", name=name)
sys.meta_path.insert(0, NoRay())
target, sys.argv = sys.argv[1], sys.argv[1:]
try:
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
        code = 0
    else:
        from selfsup.jobs.cli import main
        code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
assert not [m for m in sys.modules if m.split(".")[0] == "ray"], "ray was imported"
sys.exit(code)
"""

def run_without_ray(*argv: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_RAY, *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


def test_bench_train_fed_vs_synthetic_with_local_streams_and_no_ray(tmp_path: Path) -> None:
    data = str(tmp_path / "fm")
    assert main(["shards", "write", str(FMNIST), data, "--modality", "image", "--split", "pretrain", "--limit", "64",
                 "--samples-per-shard", "16", "--workers", "1", "--quiet"]) == 0
    proc = run_without_ray("cli", "bench", "train", "jobs/configs/simclr_image.yaml", "data.batch_size=16",
                           "data.streams=1", "objective.backbone_args.width=8", "--data", data, "--steps", "3",
                           "--warmup", "1", "--backend", "local", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert (r["objective"], r["backend"], r["batch_size"], r["device"].split()[0]) == ("simclr", "local", 16, "cpu")
    for variant in ("fed", "synthetic"):
        assert r[variant]["samples_per_s"] > 0 and r[variant]["steps"] == 3
        assert set(r[variant]["split_ms"]) == {"data_wait_ms", "h2d_ms", "fwd_bwd_ms", "optimizer_ms"}
    assert r["synthetic"]["split_ms"]["data_wait_ms"] == 0.0 < r["synthetic"]["split_ms"]["fwd_bwd_ms"]
    assert 0 <= r["fed"]["stall_pct"] <= 100
    assert r["fed_vs_synthetic"] == r["fed"]["samples_per_s"] / r["synthetic"]["samples_per_s"]
    per_cpu, cores = r["pipeline"]["samples_per_cpu_s"], r["advice"]["cores_per_accelerator"]
    assert per_cpu > 0 and cores == round(0.98 * r["synthetic"]["samples_per_s"] / per_cpu, 2)
    assert r["advice"]["streams"] >= 1 and "stream sizing" in proc.stderr


def test_gpu_check_without_a_gpu_fails_at_once_naming_why() -> None:
    started = time.monotonic()
    proc = run_without_ray("jobs/bench/gpu_check.py", env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"},
                           timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "gpu-check: no CUDA GPU visible" in proc.stderr, proc.stderr[-2000:]
    assert time.monotonic() - started < 120


def test_gpu_check_target_needs_no_virtual_environment() -> None:
    """The GPU machine has a system python3 with torch and no .venv: the target must not build one."""
    rule = re.search(r"^gpu-check:(.*)\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    assert rule is not None
    assert rule.group(1).strip() == "" and "$(PYTHON) jobs/bench/gpu_check.py" in rule.group(2)
    assert "VENV" not in rule.group(2)
