"""Writing sources into WebDataset shards with an index and a manifest row each.

The job is deterministic: items are shuffled with a seed, cut into shards of a fixed count,
and each shard gets a name from (split, digest of the job, number). A rerun of the same
command therefore maps every item to the same shard, skips shards that already have a manifest
row, and rewrites only what a killed run left invisible.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any, Callable, Mapping, Optional, Sequence

from selfsup.pipeline import manifest, storage
from selfsup.pipeline.modalities import DecodeError, MODALITIES, make_modality
from selfsup.pipeline.seeding import rng_for
from selfsup.pipeline.sources import Item, with_label
from selfsup.pipeline.tarindex import index_tar

log = logging.getLogger(__name__)
DEFAULT_SHARD_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs to write one shard (picklable)."""

    source: Any
    dest: str
    name: str
    modality: str
    split: str
    items: tuple[Item, ...]
    label_names: tuple[str, ...]
    source_meta: Mapping[str, Any]
    options: Optional[Mapping[str, Any]] = None
    strict: bool = False
    transform: Optional[Callable[[dict[str, bytes]], dict[str, bytes]]] = None


@dataclass
class ShardResult:
    """What writing one shard did: its name, sample count and the items it skipped."""

    name: str
    n_samples: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    existed: bool = False


@dataclass
class WriteReport:
    """Totals of a `shards write` run."""

    shards_written: int = 0
    shards_existing: int = 0
    samples: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


class BadSourceItem(ValueError):
    """A source item that cannot be read or decoded (raised only with --strict)."""


def job_digest(parts: Mapping[str, Any]) -> str:
    """8 hex chars naming a write job, stable across reruns of the same command."""
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=4).hexdigest()


def shard_sizes(items: Sequence[Item], samples_per_shard: Optional[int], target_bytes: int) -> int:
    """Samples per shard: given, or the count whose mean size hint fills `target_bytes`."""
    if samples_per_shard:
        if samples_per_shard < 1:
            raise ValueError(f"--samples-per-shard must be at least 1, got {samples_per_shard}")
        return samples_per_shard
    mean = max(1.0, sum(max(1, it.size_hint) for it in items) / max(1, len(items)))
    return max(1, int(target_bytes // (mean + 1024)))  # +1 KiB: tar headers per sample


def encode_item(job: ShardJob, item: Item, validator: Any) -> dict[str, bytes]:
    """Members of one item, checked by decoding them with the modality; raises on bad input."""
    members = job.source.encode(item)
    if job.transform is not None:
        members = job.transform(members)
    if validator is not None:
        validator.decode(members)
    return with_label(members, item, job.label_names)


def write_shard(job: ShardJob) -> ShardResult:
    """Encode, validate, tar, index and upload one shard, then append its manifest row."""
    import webdataset as wds  # imports torch: keep it out of `selfsup` start-up

    validator = make_modality(job.modality) if job.modality in MODALITIES else None
    result = ShardResult(job.name, 0)
    with tempfile.TemporaryDirectory(prefix="selfsup-shard-") as tmp:
        tar_path = os.path.join(tmp, job.name + ".tar")
        with open(tar_path, "wb") as f:
            writer = wds.TarWriter(f, encoder=False, mtime=0.0, user="selfsup", group="selfsup")
            for item in job.items:
                try:
                    members = encode_item(job, item, validator)
                except (DecodeError, ValueError, OSError, RuntimeError) as e:
                    if job.strict:
                        raise BadSourceItem(f"{item.key}: {e}") from e
                    result.skipped.append((str(item.ref), f"{type(e).__name__}: {e}"))
                    continue
                writer.write({"__key__": item.key, **members})
                result.n_samples += 1
            writer.close()
        if result.n_samples == 0:
            return result
        with open(tar_path, "rb") as f:
            index = index_tar(f, job.name + ".tar")
        sha = hashlib.sha256()
        with open(tar_path, "rb") as f:
            while chunk := f.read(1 << 22):
                sha.update(chunk)
        n_bytes = os.path.getsize(tar_path)
        storage.upload_file(tar_path, storage.join(job.dest, job.name + ".tar"), job.options)
        storage.write_text(storage.join(job.dest, job.name + ".idx"), index.to_json(), job.options)
    manifest.append_rows(job.dest, [{
        "path": job.name + ".tar", "index": job.name + ".idx", "modality": job.modality,
        "split": job.split, "n_samples": result.n_samples, "n_bytes": n_bytes,
        "sha256": sha.hexdigest(),
        "meta": json.dumps({**job.source_meta, "label_names": list(job.label_names)}),
    }], job.options)
    return result


def plan_jobs(source: Any, items: Sequence[Item], label_names: Sequence[str], dest: str, modality: str,
              split: str, samples_per_shard: int, job_parts: Mapping[str, Any], seed: int,
              shuffle: bool, **job_kwargs: Any) -> list[ShardJob]:
    """Shuffle items (seeded) and cut them into named shard jobs."""
    order = list(range(len(items)))
    if shuffle:
        order = [int(i) for i in rng_for("shards-write", seed, job_digest(job_parts)).permutation(len(items))]
    digest = job_digest(job_parts)
    jobs = []
    for n, lo in enumerate(range(0, len(order), samples_per_shard)):
        chunk = tuple(items[i] for i in order[lo: lo + samples_per_shard])
        jobs.append(ShardJob(source=source, dest=dest, name=f"{split}-{digest}-{n:06d}",
                             modality=modality, split=split, items=chunk,
                             label_names=tuple(label_names),
                             source_meta={"source": job_parts.get("source_type"), "job": digest},
                             **job_kwargs))
    return jobs


def run_jobs(jobs: Sequence[ShardJob], workers: int, progress: Optional[Callable[[int], None]] = None,
             options: Optional[Mapping[str, Any]] = None) -> WriteReport:
    """Write every shard not yet visible in the destination's manifest, in parallel processes."""
    report = WriteReport()
    if not jobs:
        return report
    visible = {r["path"] for r in manifest.read_manifest(jobs[0].dest, options)}
    todo = []
    for job in jobs:
        if job.name + ".tar" in visible:
            report.shards_existing += 1
            if progress:
                progress(len(job.items))
        else:
            todo.append(job)

    def account(res: ShardResult, job: ShardJob) -> None:
        report.skipped.extend(res.skipped)
        if res.n_samples:
            report.shards_written += 1
            report.samples += res.n_samples
        if progress:
            progress(len(job.items))

    if workers <= 1 or len(todo) <= 1:
        for job in todo:
            account(write_shard(job), job)
        return report
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(write_shard, job): job for job in todo}
        for fut in as_completed(futures):
            account(fut.result(), futures[fut])
    return report
