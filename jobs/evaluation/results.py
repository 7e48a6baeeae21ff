"""The evaluation results store: `<run>/eval/results.parquet`, one row per
(checkpoint, eval set, target, method, encoder).

Pretrained rows are keyed by checkpoint; baselines (random init, raw inputs) by architecture
(`arch_key`), so they are computed once and reused. Appends are conditional writes (the ETag on
S3, the generation on GCS, a content digest locally), retried when another writer got there
first, and rows whose key is already stored are not added again: concurrent evaluators lose
nothing, and a retry after a lost reply adds nothing twice.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import random
import time
from typing import Any, Mapping, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from selfsup.pipeline import storage
from selfsup.trainers import run_folder

RESULTS = "results.parquet"
COLUMNS = ("checkpoint", "step", "eval_set", "target", "method", "encoder", "accuracy", "n_train", "n_test",
           "seconds", "arch", "time")
ENCODERS = ("pretrained", "random_init", "raw")
ATTEMPTS = 50


def results_url(run_dir: str) -> str:
    """`<run>/eval/results.parquet`."""
    return run_folder.eval_url(run_dir, RESULTS)


def arch_key(meta: Mapping[str, Any]) -> str:
    """Architecture, its arguments, the seed and the eval view of a checkpoint: what a baseline depends on."""
    seed = meta.get("config", {}).get("train", {}).get("seed", 0)
    parts = {"backbone": meta["backbone"], "args": meta.get("backbone_args", {}), "seed": seed,
             "modality": meta.get("modality"), "modality_args": meta.get("modality_args", {})}
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=6).hexdigest()


def result_key(row: Mapping[str, Any]) -> tuple:
    """Identity of a result row (baselines by architecture, not checkpoint)."""
    if row["encoder"] == "pretrained":
        return (row["checkpoint"], row["eval_set"], row["target"], row["method"], "pretrained")
    return ("", row["eval_set"], row["target"], row["method"], row["encoder"], row["arch"])


def read_results(run_dir: str, opts: Optional[Mapping[str, Any]] = None) -> Optional[pa.Table]:
    """`<run>/eval/results.parquet`, or None when the run has no results yet."""
    url = results_url(run_dir)
    if not storage.exists(url, opts):
        return None
    return _parse(storage.read_bytes(url, options=opts))


def read_rows(run_dir: str, opts: Optional[Mapping[str, Any]] = None) -> list[dict[str, Any]]:
    """Every stored row as a dict, in the order they were appended ([] when none)."""
    table = read_results(run_dir, opts)
    return table.to_pylist() if table is not None else []


def existing_keys(run_dir: str, opts: Optional[Mapping[str, Any]] = None) -> set:
    """The result keys already stored."""
    return {result_key(r) for r in read_rows(run_dir, opts)}


def append_results(run_dir: str, rows: Sequence[Mapping[str, Any]],
                   opts: Optional[Mapping[str, Any]] = None) -> int:
    """Add rows whose key is not stored yet; returns how many were added. Safe under concurrent writers."""
    bad = [sorted(set(COLUMNS) - set(r)) for r in rows if not set(COLUMNS) <= set(r)]
    if bad:
        raise ValueError(f"result rows lack columns {bad[0]}; a row needs {', '.join(COLUMNS)}")
    url = results_url(run_dir)
    if storage.protocol_of(url) not in ("file", "s3", "gs"):  # e.g. memory://: one process, no contention
        old = read_results(run_dir, opts)
        table, added = _merged(old, rows)
        if added:
            storage.write_bytes(url, _serialize(table), opts)
        return added
    for _ in range(ATTEMPTS):
        data, version = storage.read_versioned(url, opts)
        table, added = _merged(_parse(data) if data is not None else None, rows)
        if not added:
            return 0
        body = _serialize(table)
        if (storage.write_if_absent(url, body, opts) if version is None
                else storage.write_if_version(url, body, version, opts)):
            return added
        time.sleep(0.05 * random.random())  # another writer got there first: read again
    raise OSError(errno.EAGAIN, f"could not append to {storage.redact_url(url)}: too much contention")


def accuracy(run_dir: str, eval_set: str, target: str, method: str, encoder: str,
             checkpoint: Optional[str] = None, opts: Optional[Mapping[str, Any]] = None) -> float:
    """The newest stored accuracy: a checkpoint's (encoder "pretrained") or a baseline's."""
    if encoder not in ENCODERS:
        raise ValueError(f"encoder {encoder!r}: valid encoders are {', '.join(ENCODERS)}")
    rows = [r for r in read_rows(run_dir, opts)
            if r["eval_set"] == eval_set and r["target"] == target and r["method"] == method
            and r["encoder"] == encoder and (encoder != "pretrained" or r["checkpoint"] == checkpoint)]
    if not rows:
        raise ValueError(f"no {encoder} {method} result for {eval_set}/{target} in {storage.redact_url(run_dir)}; "
                         "evaluate the checkpoint first (selfsup evaluate)")
    return float(rows[-1]["accuracy"])


def _parse(data: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(data))


def _serialize(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _merged(old: Optional[pa.Table], rows: Sequence[Mapping[str, Any]]) -> tuple[pa.Table, int]:
    """`old` plus the rows whose key it lacks (first of duplicates within `rows`); and how many."""
    seen = {result_key(r) for r in old.to_pylist()} if old is not None else set()
    new = []
    for r in rows:
        if result_key(r) not in seen:
            seen.add(result_key(r))
            new.append({c: r[c] for c in COLUMNS})
    if not new:
        return (old if old is not None else pa.Table.from_pylist([])), 0
    table = pa.Table.from_pylist(new)
    if old is not None:
        table = pa.concat_tables([old, table.cast(old.schema)])
    return table, len(new)
