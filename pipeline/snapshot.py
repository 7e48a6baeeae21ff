"""Run snapshots: the manifest rows a run trains on, frozen in `<run>/manifest.parquet` when it starts.

Planning and resuming read only the snapshot, so shards appended to a dataset later never change
a running epoch. Several sources (dataset URL + split) can be mixed with weights; the weights are
stored in the snapshot too, and so is each labeled source's `target` (S4L: a run may mix an
unlabeled source with a labeled one; train batches then carry `label` per row, -1 where unlabeled).

Every sample has a stable id in the run: its ordinal in the snapshot's sorted shard list
(`sample_ids`), the same on any world size and across resumes (Exemplar-CNN's surrogate classes).
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from selfsup.pipeline import manifest, storage

SNAPSHOT_FILE = "manifest.parquet"


@dataclass(frozen=True)
class SourceSpec:
    """One dataset to draw from: its URL, which split, and its mixing weight (None = by size).

    Also the config schema of each `data.sources` entry (trainers/config.py), so a loaded config's
    sources go to build_snapshot as they are.
    """

    url: str
    split: str = "pretrain"
    weight: Optional[float] = None
    name: str = ""
    # a labeled source: "cls" or a key of the samples' .json; its rows carry that label in train
    # batches (-1 where a sample lacks it), rows of other sources -1. With weights, the labeled
    # fraction of a run is this source's weight over the sum of the weights (without, its share of samples)
    target: Optional[str] = None

    def __post_init__(self) -> None:
        if self.target is not None and (not isinstance(self.target, str) or not self.target.strip()):
            raise ValueError(f"data.sources target={self.target!r} for {storage.redact_url(self.url)}#{self.split}: "
                             "give 'cls' or a key of the samples' .json, or leave it out for an unlabeled source")

    @property
    def label(self) -> str:
        return self.name or f"{storage.redact_url(self.url)}#{self.split}"


@dataclass(frozen=True)
class ShardRef:
    """A shard as the planner and streams see it."""

    url: str
    index_url: str
    n_samples: int
    source: str
    sha256: str = ""


@dataclass(frozen=True)
class Snapshot:
    """The frozen shard list of a run, sorted by shard URL, with per-source weights."""

    shards: tuple[ShardRef, ...]
    weights: tuple[tuple[str, Optional[float]], ...]
    modality: str
    targets: tuple[tuple[str, str], ...] = ()  # (source, label target) of each labeled source

    @functools.cached_property
    def n_samples(self) -> int:
        return sum(s.n_samples for s in self.shards)

    @functools.cached_property
    def offsets(self) -> np.ndarray:
        """[S] int64: the snapshot ordinal of each shard's first sample (samples of earlier shards)."""
        return np.concatenate([[0], np.cumsum([s.n_samples for s in self.shards])[:-1]]).astype(np.int64)

    def target_of(self, shard: int) -> Optional[str]:
        """The label target of shard `shard`'s source, None when that source is unlabeled."""
        return dict(self.targets).get(self.shards[shard].source)

    def digest(self) -> str:
        """A short stable id of the snapshot's content."""
        return self._digest

    @functools.cached_property
    def _digest(self) -> str:
        h = hashlib.blake2b(digest_size=8)
        for s in self.shards:
            h.update(f"{s.url}|{s.n_samples}|{s.sha256}|{s.source}\n".encode())
        h.update(json.dumps(self.weights).encode())
        if self.targets:  # absent from unlabeled snapshots, whose digests stay as they were
            h.update(json.dumps(self.targets).encode())
        return h.hexdigest()

    def __hash__(self) -> int:  # computed once: plan_epoch's cache looks snapshots up on every batch
        return hash(self._digest)

    def weight_of(self, source: str) -> Optional[float]:
        return dict(self.weights).get(source)


def sample_ids(snapshot: Snapshot, shards: Sequence[int], positions: Sequence[int], pad: int = 0) -> np.ndarray:
    """[len(shards) + pad] int64: each sample's ordinal in the snapshot (earlier shards' samples +
    its position in its shard), -1 for `pad` padding rows. A pure function of the snapshot, so the
    same on any world size or plan and across resumes; unique within the snapshot."""
    ids = snapshot.offsets[np.asarray(shards, np.int64)] + np.asarray(positions, np.int64) if len(shards) else \
        np.zeros(0, np.int64)
    return np.concatenate([ids, np.full(pad, -1, np.int64)])


def build_snapshot(sources: Sequence[SourceSpec], modality: Optional[str] = None,
                   options: Optional[Mapping[str, Any]] = None, as_of: Any = None) -> Snapshot:
    """Read the sources' manifests now and freeze the visible shards of the chosen splits."""
    if not sources:
        raise ValueError("no data sources configured (data.sources is empty)")
    weights = [s.weight for s in sources]
    if any(w is not None for w in weights) and any(w is None for w in weights):
        raise ValueError("give every source a weight, or none (then sources mix by size)")
    if any(w is not None and w <= 0 for w in weights):
        raise ValueError(f"source weights must be positive, got {weights}")
    refs: dict[str, ShardRef] = {}
    modalities = set()
    for src in sources:
        manifest.require_dataset(src.url, options)
        rows = [r for r in manifest.read_manifest(src.url, options, as_of=as_of) if r["split"] == src.split]
        if not rows:
            raise ValueError(f"no visible shards with split {src.split!r} in {storage.redact_url(src.url)} "
                             "(see `selfsup shards ls`)")
        for r in rows:
            url = manifest.locate(src.url, r)
            refs[url] = ShardRef(url, manifest.locate(src.url, r, "index"), int(r["n_samples"]), src.label,
                                 r["sha256"])
            modalities.add(r["modality"])
    if modality is not None and modalities != {modality}:
        raise ValueError(f"sources hold {sorted(modalities)} shards but the run is configured for {modality!r}")
    if len(modalities) != 1:
        raise ValueError(f"sources mix modalities {sorted(modalities)}; a run uses one")
    return Snapshot(tuple(refs[u] for u in sorted(refs)), tuple((s.label, s.weight) for s in sources),
                    modalities.pop(), tuple((s.label, s.target) for s in sources if s.target))


def snapshot_table(snap: Snapshot) -> pa.Table:
    """The snapshot as a Parquet-ready table (weights and modality in the schema metadata)."""
    table = pa.Table.from_pylist([s.__dict__ for s in snap.shards], schema=pa.schema([
        ("url", pa.string()), ("index_url", pa.string()), ("n_samples", pa.int64()),
        ("source", pa.string()), ("sha256", pa.string())]))
    meta = {"weights": json.dumps(snap.weights), "modality": snap.modality}
    if snap.targets:
        meta["targets"] = json.dumps(snap.targets)
    return table.replace_schema_metadata({k.encode(): v.encode() for k, v in meta.items()})


def save_snapshot(snap: Snapshot, run_dir: str, options: Optional[Mapping[str, Any]] = None) -> str:
    """Write `<run>/manifest.parquet` atomically; returns its URL."""
    buf = io.BytesIO()
    pq.write_table(snapshot_table(snap), buf)
    url = storage.join(run_dir, SNAPSHOT_FILE)
    storage.write_bytes(url, buf.getvalue(), options)
    return url


def load_snapshot(run_dir: str, options: Optional[Mapping[str, Any]] = None) -> Snapshot:
    """Read a run's snapshot."""
    url = storage.join(run_dir, SNAPSHOT_FILE)
    table = pq.read_table(io.BytesIO(storage.read_bytes(url, options=options)))
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    shards = tuple(ShardRef(**row) for row in table.to_pylist())
    weights = tuple((str(n), w) for n, w in json.loads(meta.get("weights", "[]")))
    targets = tuple((str(n), str(t)) for n, t in json.loads(meta.get("targets", "[]")))
    return Snapshot(shards, weights, meta.get("modality", ""), targets)


def snapshot_for_run(run_dir: str, sources: Sequence[SourceSpec], modality: Optional[str] = None,
                     options: Optional[Mapping[str, Any]] = None, rebuild: bool = False) -> Snapshot:
    """The run's snapshot: the saved one when resuming (unless `rebuild`), else a new one, saved now."""
    if not rebuild and storage.exists(storage.join(run_dir, SNAPSHOT_FILE), options):
        return load_snapshot(run_dir, options)
    snap = build_snapshot(sources, modality, options)
    save_snapshot(snap, run_dir, options)
    return snap
