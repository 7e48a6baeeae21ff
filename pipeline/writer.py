"""Writing sources into WebDataset shards with an index and a manifest row each.

The job is deterministic: items are shuffled with a seed, cut into shards of a fixed count,
and each shard gets a name from (split, digest of the job, number). A rerun of the same
command therefore maps every item to the same shard, skips shards that already have a manifest
row, and rewrites only what a killed run left invisible. Each shard's ledger (pipeline/ledger.py)
records the source items it holds, so a rerun over a dataset that holds some of the items (a
killed run, or a source that gained files) writes only the others, as new shards.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from typing import Any, Callable, Mapping, Optional, Sequence

from selfsup.pipeline import ledger, manifest, storage
from selfsup.pipeline.modalities import DecodeError, MODALITIES, make_modality
from selfsup.pipeline.modalities.base import check_decodes
from selfsup.pipeline.seeding import rng_for
from selfsup.pipeline.sources.base import DEFAULT_MAX_ITEM_BYTES, Item, disambiguated_key, item_name, with_label
from selfsup.pipeline.tarindex import ShardIndex, index_tar

log = logging.getLogger(__name__)
DEFAULT_SHARD_BYTES = 256 * 1024 * 1024
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # what a split may be: it lands in shard file names


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
    scope: str = ""  # the ledger scope (`scope_digest`); "" writes no ledger
    max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES  # larger source files are skipped unread


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


def check_split(split: str) -> str:
    """The split name if it is safe inside a shard's file name; ValueError naming it otherwise."""
    if not isinstance(split, str) or not NAME.fullmatch(split):
        raise ValueError(f"--split {split!r} is not a valid split name: use 1-64 letters, digits, '-' or '_', "
                         "starting with a letter or digit (e.g. pretrain, probe-train)")
    return split


def job_digest(parts: Mapping[str, Any]) -> str:
    """8 hex chars naming a write job, stable across reruns of the same command."""
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=4).hexdigest()


def scope_digest(parts: Mapping[str, Any]) -> str:
    """The ledger scope of a write job: its digest without the settings that only cut and order shards."""
    return job_digest({k: v for k, v in parts.items() if k not in ("per_shard", "shuffle")})


@dataclass
class Increment:
    """A write compared with what the dataset already holds (from its ledgers)."""

    pending: list[Item]                                  # to write
    held: int = 0                                        # items of this scope already in the dataset
    shards_held: int = 0                                 # visible shards holding them
    changed: list[tuple[str, str]] = field(default_factory=list)  # (name, shard): content differs; not written
    removed: list[str] = field(default_factory=list)     # held, no longer in the source; kept
    renamed: list[tuple[str, str]] = field(default_factory=list)  # (name, key): key taken by a held item


def compare_with_dataset(items: Sequence[Item], holdings: ledger.Holdings, scope: str) -> Increment:
    """Which items the dataset lacks; items held under the same name are skipped, or reported if changed.

    A pending item whose key a held item of another name has gets `disambiguated_key`.
    """
    held = holdings.in_scope(scope)
    keys = holdings.keys()
    inc = Increment(pending=[])
    current = set()
    for it in items:
        name = item_name(it)
        current.add(name)
        entry = held.get(name)
        if entry is None:
            if keys.get(it.key, name) != name:
                it = replace(it, key=disambiguated_key(it))
                inc.renamed.append((name, it.key))
            inc.pending.append(it)
        elif entry.fingerprint and it.fingerprint and entry.fingerprint != it.fingerprint:
            inc.changed.append((name, entry.shard))
    inc.held = len(held)
    inc.shards_held = len({e.shard for e in held.values()})
    inc.removed = sorted(set(held) - current)
    return inc


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
    members = job.source.encode(item, job.max_item_bytes)
    if job.transform is not None:
        members = job.transform(members)
    if validator is not None:
        check_decodes(validator, members)
    return with_label(members, item, job.label_names)


def write_shard(job: ShardJob) -> ShardResult:
    """Encode, validate, tar, index and upload one shard, then append its manifest row."""
    import webdataset as wds  # imports torch: keep it out of `selfsup` start-up

    validator = make_modality(job.modality) if job.modality in MODALITIES else None
    result = ShardResult(job.name, 0)
    written: list[str] = []
    entries: list[tuple[str, str, str]] = []
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
                written.append(item.key)
                entries.append((item_name(item), item.key, item.fingerprint))
                result.n_samples += 1
            writer.close()
        if result.n_samples == 0:
            return result
        with open(tar_path, "rb") as f:
            index = index_tar(f, job.name + ".tar")
        check_index_matches(index, written)
        sha = hashlib.sha256()
        with open(tar_path, "rb") as f:
            while chunk := f.read(1 << 22):
                sha.update(chunk)
        n_bytes = os.path.getsize(tar_path)
        storage.upload_file(tar_path, storage.join(job.dest, job.name + ".tar"), job.options)
        storage.write_text(storage.join(job.dest, job.name + ".idx"), index.to_json(), job.options)
        if job.scope:
            ledger.write_ledger(job.dest, job.name + ".tar", job.scope, entries, job.options)
    manifest.append_rows(job.dest, [{
        "path": job.name + ".tar", "index": job.name + ".idx", "modality": job.modality,
        "split": job.split, "n_samples": result.n_samples, "n_bytes": n_bytes,
        "sha256": sha.hexdigest(),
        "meta": json.dumps({**job.source_meta, "label_names": list(job.label_names)}),
    }], job.options)
    return result


def check_index_matches(index: ShardIndex, written: Sequence[str]) -> None:
    """Internal invariant, checked before the manifest row: the index holds exactly the samples written."""
    if list(index.keys) != list(written):
        raise AssertionError(f"shard {index.shard}: its index holds {len(index)} sample(s) but {len(written)} were "
                             "written (sample keys collide); no manifest row written")


def plan_jobs(source: Any, items: Sequence[Item], label_names: Sequence[str], dest: str, modality: str,
              split: str, samples_per_shard: int, job_parts: Mapping[str, Any], seed: int,
              shuffle: bool, **job_kwargs: Any) -> list[ShardJob]:
    """Shuffle items (seeded) and cut them into named shard jobs; items must have unique keys (`unique_keys`)."""
    check_split(split)
    if len({it.key for it in items}) != len(items):
        raise ValueError("sample keys are not unique: pass the items through sources.unique_keys first")
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
