"""Frozen features of labeled shards, made on Ray actors (or inline) with the pipeline in eval mode.

Eval mode: no augmentation, every sample exactly once, the last batch padded and its padding
flagged; quarantined rows are left out. One pass decodes each batch once and feeds every
requested encoder: the pretrained checkpoint, a random init of the same architecture and seed,
and the raw inputs (average-pooled to at most RAW_DIMS values).
"""
from __future__ import annotations

import inspect
import logging
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.pipeline.batch import BatchMaker, FeedSpec
from selfsup.trainers.inputs import to_device

log = logging.getLogger(__name__)

RAW_DIMS = 4096
INPUT_FIELDS = ("image", "video", "spec", "wave")


def build_encoder(ref: Mapping[str, Any], options: Optional[Mapping[str, Any]] = None) -> Optional[nn.Module]:
    """{"kind": "pretrained", "checkpoint"} | {"kind": "random_init", "spec", "seed"} | {"kind": "raw"}."""
    from selfsup.trainers.backbones import backbone_from_spec
    from selfsup.trainers.encoder import load_encoder

    if ref["kind"] == "pretrained":
        return load_encoder(ref["checkpoint"], options)
    if ref["kind"] == "random_init":
        torch.manual_seed(int(ref["seed"]))
        return backbone_from_spec(ref["spec"]).eval()
    if ref["kind"] == "raw":
        return None
    raise ValueError(f"unknown encoder kind {ref['kind']!r}; valid: pretrained, random_init, raw")


def raw_features(x: torch.Tensor) -> torch.Tensor:
    """Inputs flattened, average-pooled along the last axes to at most RAW_DIMS values: [B, ≤RAW_DIMS]."""
    flat = x.reshape(x.shape[0], -1).float()
    if flat.shape[1] <= RAW_DIMS:
        return flat
    factor = math.ceil(flat.shape[1] / RAW_DIMS)
    return F.avg_pool1d(flat[:, None], factor, factor, ceil_mode=True)[:, 0]


def encode(encoder: Optional[nn.Module], inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Features [B, D] of the eval input field (raw inputs when `encoder` is None)."""
    field = next((f for f in INPUT_FIELDS if f in inputs), None)
    if field is None:
        raise ValueError(f"eval batch holds none of {INPUT_FIELDS} (it holds {sorted(inputs)})")
    x = inputs[field]
    if encoder is None:
        return raw_features(x)
    if field == "wave" and "length" in inspect.signature(encoder.forward).parameters:
        return encoder(x, inputs["length"])
    return encoder(x)


class FeatureWorker:
    """Makes eval batch i and returns every encoder's features for its real, non-quarantined rows."""

    def __init__(self, spec: FeedSpec, refs: Mapping[str, Mapping[str, Any]],
                 mean: Optional[Sequence[float]], std: Optional[Sequence[float]], device: str = "cpu") -> None:
        self.maker = BatchMaker(spec)
        self.device = torch.device("cuda" if device == "cuda" and torch.cuda.is_available() else "cpu")
        self.encoders = {name: build_encoder(ref, spec.storage_options) for name, ref in refs.items()}
        for enc in self.encoders.values():
            if enc is not None:
                enc.to(self.device)
        self.mean, self.std = mean, std

    def node_id(self) -> str:
        """The Ray node the actor runs on (RayNodes judges its death by it)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    @torch.no_grad()
    def features(self, i: int) -> dict[str, Any]:
        batch = self.maker.make(0, i)
        keep = batch["valid"] & ~batch["quarantined"]
        inputs = to_device(batch, self.device, self.mean, self.std)
        out: dict[str, Any] = {name: encode(enc, inputs)[torch.from_numpy(keep).to(self.device)].cpu().numpy()
                               for name, enc in self.encoders.items()}
        out["label"] = batch["label"][keep]
        out["key"] = np.char.add(np.char.add(batch["shard"][keep], "#"), batch["key"][keep])
        out["quarantined"] = int(batch["quarantined"][batch["valid"]].sum())
        return out


def extract(spec: FeedSpec, refs: Mapping[str, Mapping[str, Any]], mean: Optional[Sequence[float]],
            std: Optional[Sequence[float]], workers: int = 1, use_ray: bool = True, num_cpus: float = 1.0,
            num_gpus: float = 0.0, progress: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
    """Features of every sample of `spec` (train=False) for each encoder; arrays in plan order."""
    if spec.train:
        raise ValueError("feature extraction needs an eval feed spec (train=False)")
    n = spec.plan(0).num_batches
    device = "cuda" if num_gpus > 0 else "cpu"
    parts: list[dict[str, Any]] = []
    if use_ray:
        parts = _extract_on_ray(spec, (refs, mean, std, device), n, max(1, workers),
                                {"CPU": num_cpus, "GPU": num_gpus}, progress)
    else:
        worker = FeatureWorker(spec, refs, mean, std, device)
        for i in range(n):
            parts.append(worker.features(i))
            if progress:
                progress(1)
    return _concat(parts, list(refs))


def _extract_on_ray(spec: FeedSpec, args: tuple, n: int, workers: int, resources: Mapping[str, float],
                    progress: Optional[Callable[[int], None]]) -> list[dict[str, Any]]:
    """Eval batches 0..n-1 on `workers` FeatureWorker actors, in order. A worker that dies is replaced and
    its batches sent again. Its death counts against the batch it was making unless its node died or
    stopped answering (RayNodes.judge): a batch that kills MAX_DEATHS workers stops the job naming its
    samples; one lost with node after node (MAX_LOST) stops it saying so."""
    import ray

    from selfsup.pipeline.feed import MAX_DEATHS
    from selfsup.pipeline.workers import MAX_LOST, RayNodes, StreamLost, kill, ray_deaths

    actor: Any = ray.remote(max_restarts=0, max_task_retries=0)(FeatureWorker)
    nodes = RayNodes()

    def start() -> tuple[Any, Any]:
        return nodes.started(actor.options(num_cpus=resources["CPU"], num_gpus=resources["GPU"],
                                           **nodes.placement()).remote(spec, *args))

    pool = [start() for _ in range(workers)]
    deaths, lost, parts = [0] * n, [0] * n, []
    try:
        sent = [pool[i % workers][0].features.remote(i) for i in range(n)]
        for i in range(n):
            slot = i % workers
            while True:
                try:
                    parts.append(nodes.get(sent[i], f"eval batch {i}", pool[slot][1], resources, "--worker-cpus, --gpus"))
                    break
                except ray_deaths() as e:
                    why = nodes.judge(e, *pool[slot])
                    if isinstance(why, StreamLost):
                        lost[i] += 1
                        if lost[i] > MAX_LOST:
                            raise RuntimeError(f"eval batch {i} was lost {lost[i]} times ({why}): nodes keep "
                                               f"failing") from None
                    else:
                        deaths[i] += 1
                        if deaths[i] >= MAX_DEATHS:
                            raise RuntimeError(f"eval batch {i} kills the worker making it ({why}, {deaths[i]} "
                                               f"times); its samples: {_names(spec, i)}") from None
                    log.warning("the worker making eval batch %d died (%s): starting a new one and sending "
                                "its batches again", i, why)
                    kill(pool[slot][0])
                    pool[slot] = start()
                    for j in range(i, n, workers):
                        sent[j] = pool[slot][0].features.remote(j)
            if progress:
                progress(1)
    finally:
        for a, _ in pool:
            kill(a)
    return parts


def _names(spec: FeedSpec, i: int, limit: int = 20) -> str:
    """'shard key; …' of eval batch i (from the indexes; nothing decoded)."""
    from selfsup.pipeline import storage

    keys = BatchMaker(spec).keys(0, i)
    more = f"; … ({len(keys) - limit} more)" if len(keys) > limit else ""
    return "; ".join(f"{storage.redact_url(s)} {k}" for s, k in keys[:limit]) + more


def _concat(parts: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {name: np.concatenate([p[name] for p in parts]) for name in names}
    out["label"] = np.concatenate([p["label"] for p in parts])
    out["key"] = np.concatenate([p["key"] for p in parts])
    out["quarantined"] = sum(p["quarantined"] for p in parts)
    if len(set(out["key"].tolist())) != len(out["key"]):
        raise RuntimeError("eval delivered a sample twice; the eval plan is broken")  # invariant
    return out
