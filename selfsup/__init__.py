"""selfsup: distributed self-supervised pretraining on Ray.

The repository's top-level folders install as subpackages of this one (pyproject's package-dir):
`pipeline/` → `selfsup.pipeline` (data: storage, shards, plans, modalities, streams, feeds),
`trainers/` → `selfsup.trainers` (objectives, backbones, the training loop, checkpoints) and
`jobs/` → `selfsup.jobs` (the `selfsup` command line and its engines).

The public API is importable from here; names load on first use, so `import selfsup` stays light:

    import selfsup
    encoder = selfsup.load_encoder("s3://bucket/runs/a")     # weights_only load of the latest checkpoint
    plan = selfsup.plan_epoch(selfsup.load_snapshot("runs/a"), seed=0, epoch=0, batch_size=256)
    ds = ray.data.read_webdataset(selfsup.tar_urls("s3://bucket/data", "pretrain"))  # the tars only, no .idx
"""
from __future__ import annotations

import importlib
import os
from typing import Any

__version__ = "0.1.0"

# Run from a checkout (this folder beside pipeline/, trainers/, jobs/), the subpackages are found
# in the checkout's root, exactly as pyproject's package-dir maps them for an install. This keeps
# a checkout on sys.path (a job's working_dir, a container's WORKDIR, `python -m` from the root)
# from shadowing an installed selfsup with a package that lacks its subpackages.
_here = os.path.dirname(os.path.abspath(__file__))
_root = os.path.dirname(_here)
if not os.path.isdir(os.path.join(_here, "pipeline")) and all(
        os.path.isfile(os.path.join(_root, name, "__init__.py")) for name in ("pipeline", "trainers", "jobs")):
    __path__.append(_root)  # noqa: F821 - __path__ is set by the import system

# public name → module that defines it
_API = {
    "load_encoder": "selfsup.trainers.encoder",
    "export_checkpoint": "selfsup.trainers.export",
    "PretrainConfig": "selfsup.trainers.config",
    "load_config": "selfsup.pipeline.config",
    "BatchFeed": "selfsup.pipeline.feed",
    "FeedSpec": "selfsup.pipeline.batch",
    "plan_epoch": "selfsup.pipeline.plan",
    "EpochPlan": "selfsup.pipeline.plan",
    "SourceSpec": "selfsup.pipeline.snapshot",
    "Snapshot": "selfsup.pipeline.snapshot",
    "build_snapshot": "selfsup.pipeline.snapshot",
    "load_snapshot": "selfsup.pipeline.snapshot",
    "tar_urls": "selfsup.pipeline.manifest",
    "make_modality": "selfsup.pipeline.modalities",
    "make_objective": "selfsup.trainers.objectives",
    "make_backbone": "selfsup.trainers.backbones",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'selfsup' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
