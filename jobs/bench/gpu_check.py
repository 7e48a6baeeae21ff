"""`make gpu-check`: the one GPU measurement, for a machine with one NVIDIA GPU and no Ray.

    python3 jobs/bench/gpu_check.py [--seconds 120] [--data PHOTOS] [--out FILE]

Runs from a plain checkout (no install, no virtual environment, nothing from the network): the
system Python with torch and torchvision, plus numpy, opencv, pillow, pyarrow, fsspec and pyyaml
(the device image has them). What it may lack is carried in `.gpu-check/` (`make gpu-check-prepare`
here copies the photos and the pure-Python webdataset and braceexpand there). It

1. stops within seconds, exit 2, naming the reason, when no CUDA GPU is visible or a module is missing;
2. writes the photos (`--data`, else .gpu-check/photos, ../shared/datasets/photos, …) into
   shards in a temporary folder;
3. runs `selfsup bench train` (local-process streams, one per core but two) for MAE ViT-B/16 and
   SimCLR ResNet-50 at 224 px, each for about --seconds;
4. prints one table (samples/s fed vs synthetic, stall %, GPU memory, the step-time split, the cores
   per GPU the pipeline needs) and writes every figure as JSON to --out (and to $OUT, if set).
"""
from __future__ import annotations

import sys

if sys.path and sys.path[0] == __import__("os").path.dirname(__import__("os").path.abspath(__file__)):
    del sys.path[0]  # run as a script: its folder's modules (train.py, pipeline.py) must not shadow others

import argparse
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[2]
CARRIED = ROOT / ".gpu-check"  # what `make gpu-check-prepare` leaves for the GPU machine
RECIPES = ("mae_vit_b16", "simclr_resnet50")
CARRY_MODULES = ("webdataset", "braceexpand")  # pure Python, missing on the GPU machine
NEEDED = ("torch", "torchvision", "numpy", "cv2", "PIL", "pyarrow", "fsspec", "yaml", "webdataset", "timm")


def fail(message: str) -> int:
    """Print why the check cannot run; the exit status is 2."""
    print(f"gpu-check: {message}", file=sys.stderr, flush=True)
    return 2


def preflight() -> Optional[str]:
    """Why this machine cannot run the check (no CUDA GPU, a missing module), or None."""
    if (CARRIED / "site").is_dir():
        sys.path.insert(0, str(CARRIED / "site"))
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if "torch" in missing:
        return "torch is not importable here; run it with the Python that has torch (python3 on the GPU machine)"
    import torch

    if not torch.cuda.is_available():
        return (f"no CUDA GPU visible (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}, "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): this check measures a "
                "GPU; on CPU use `selfsup bench train CONFIG`")
    if missing:
        return (f"module(s) {', '.join(missing)} missing; run `make gpu-check-prepare` where pip works and carry "
                ".gpu-check/ along (webdataset and braceexpand are pure Python)")
    return None


def find_photos(data: Optional[str]) -> Path:
    """--data, else the carried photos, else the shared datasets beside the checkout."""
    candidates = [Path(data)] if data else []
    candidates += [CARRIED / "photos", ROOT / "shared" / "datasets" / "photos", ROOT.parent / "shared" / "datasets" / "photos"]
    if os.environ.get("SELFSUP_DATA"):
        candidates.append(Path(os.environ["SELFSUP_DATA"]) / "photos")
    for c in candidates:
        if c.is_dir() and any(c.glob("*.jpg")):
            return c
    raise FileNotFoundError(f"no photos found (looked in {', '.join(map(str, candidates))}); pass --data FOLDER")


def prepare(photos: Path) -> None:
    """Here, where the packages are installed: copy the photos and the pure-Python modules the GPU machine
    lacks into .gpu-check/ (carry it along: `run(..., carry=[".gpu-check"])`)."""
    import shutil

    shutil.copytree(photos, CARRIED / "photos", dirs_exist_ok=True)
    for name in CARRY_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            raise FileNotFoundError(f"{name} is not installed here; `make setup` first")
        origin = Path(spec.origin)
        if origin.name == "__init__.py":
            shutil.copytree(origin.parent, CARRIED / "site" / name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (CARRIED / "site").mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, CARRIED / "site" / origin.name)
    print(f"gpu-check: {CARRIED} holds the photos and {', '.join(CARRY_MODULES)}; carry it to the GPU machine")


def write_shards(photos: Path, dest: Path) -> str:
    """The photos as pretraining shards under `dest` (the table goes to stderr)."""
    import contextlib

    from selfsup.jobs.cli import main

    with contextlib.redirect_stdout(sys.stderr):
        code = main(["shards", "write", str(photos), str(dest), "--modality", "image", "--split", "pretrain",
                     "--samples-per-shard", "16", "--workers", str(max(1, min(8, (os.cpu_count() or 2) - 2))),
                     "--quiet"])
    if code:
        raise RuntimeError(f"writing shards of {photos} failed (exit {code})")
    return str(dest)


def measure(recipe: str, data: str, seconds: float, streams: int) -> dict[str, Any]:
    """`selfsup bench train` of one GPU recipe on the shards."""
    from selfsup.jobs.bench.train import TrainBenchOptions, bench_train

    return bench_train(TrainBenchOptions(config=str(ROOT / "jobs" / "configs" / "gpu" / f"{recipe}.yaml"),
                                         overrides=(f"data.streams={streams}", "data.mix=2"),
                                         seconds=seconds, warmup=5, backend="local", data=data))


def table(results: dict[str, dict[str, Any]]) -> str:
    """One line per recipe: fed vs synthetic, stall, memory, the step split, the cores a GPU needs."""
    head = (f"{'recipe':<18}{'fed/s':>9}{'synth/s':>9}{'fed/syn':>8}{'stall%':>8}{'GiB':>7}"
            f"{'data':>7}{'h2d':>6}{'fwd+bwd':>9}{'optim':>7}{'per CPU-s':>10}{'cores/GPU':>10}")
    lines = [head]
    for name, r in results.items():
        f, s, split = r["fed"], r["synthetic"], r["fed"]["split_ms"]
        lines.append(f"{name:<18}{f['samples_per_s']:>9.1f}{s['samples_per_s']:>9.1f}{r['fed_vs_synthetic']:>8.2f}"
                     f"{f['stall_pct']:>8.1f}{s['gpu_mem_gib'] or 0:>7.1f}{split['data_wait_ms']:>7.1f}"
                     f"{split['h2d_ms']:>6.1f}{split['fwd_bwd_ms']:>9.1f}{split['optimizer_ms']:>7.1f}"
                     f"{r['pipeline']['samples_per_cpu_s'] or 0:>10.1f}{r['advice']['cores_per_accelerator'] or 0:>10.2f}")
    return "\n".join(lines) + "\n(split in ms per step of the fed run; cores/GPU: for a stall under 2% at the synthetic ceiling)"


def main(argv: Optional[list[str]] = None) -> int:
    """Check, measure both recipes, print the table; exit 2 without a GPU or a module."""
    p = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=120.0, help="per recipe (default 120)")
    p.add_argument("--data", help="a folder of JPEG photos (default: .gpu-check/photos, ../shared/datasets/photos)")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated subset of {','.join(RECIPES)}")
    p.add_argument("--out", default="runs/gpu-check.json", help="the JSON result (default runs/gpu-check.json)")
    p.add_argument("--prepare", action="store_true", help="here, before a GPU session: copy the photos and "
                                                           "the modules the GPU machine lacks into .gpu-check/")
    args = p.parse_args(argv)
    if args.prepare:
        prepare(find_photos(args.data))
        return 0
    why = preflight()
    if why:
        return fail(why)
    sys.path.insert(0, str(ROOT))  # `import selfsup` from the checkout: selfsup/__init__ maps the folders
    try:
        photos = find_photos(args.data)
    except FileNotFoundError as e:
        return fail(str(e))
    import torch

    print(f"gpu-check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, {os.cpu_count()} CPUs; "
          f"photos from {photos}", file=sys.stderr, flush=True)
    streams = max(1, (os.cpu_count() or 2) - 2)
    results = {}
    with tempfile.TemporaryDirectory(prefix="selfsup-gpu-check-") as tmp:
        data = write_shards(photos, Path(tmp) / "photos")
        for recipe in [r.strip() for r in args.recipes.split(",") if r.strip()]:
            results[recipe] = measure(recipe, data, args.seconds, streams)
    text = table(results)
    print(text, flush=True)
    for out in [args.out] + ([os.path.join(os.environ["OUT"], "gpu-check.json")] if os.environ.get("OUT") else []):
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
