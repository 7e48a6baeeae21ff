"""The manifest: append-only Parquet parts under `<dataset>/_manifest/`, one row per shard event.

A shard becomes visible only when its row lands, after its bytes and index are fully written.
Writers never rewrite a part, so concurrent writers lose nothing. Readers union every part,
keep the newest row per shard path, and drop paths whose newest row is a tombstone.
"""
from __future__ import annotations

import datetime as dt
import io
import json
import os
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from selfsup.pipeline import storage

MANIFEST_DIR = "_manifest"
SCHEMA = pa.schema([
    ("path", pa.string()),          # shard path relative to the dataset root
    ("index", pa.string()),         # index path relative to the dataset root
    ("modality", pa.string()),
    ("split", pa.string()),
    ("n_samples", pa.int64()),
    ("n_bytes", pa.int64()),
    ("sha256", pa.string()),
    ("created_at", pa.timestamp("us", tz="UTC")),
    ("writer_id", pa.string()),
    ("tombstone", pa.bool_()),
    ("meta", pa.string()),          # JSON: source description, label names, ...
])
COLUMNS = [f.name for f in SCHEMA]


def writer_id() -> str:
    """An id naming this writing process (host, pid, random suffix)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def now_utc() -> dt.datetime:
    """The current time, UTC, microsecond precision."""
    return dt.datetime.now(dt.timezone.utc)


def append_rows(dataset: str, rows: Sequence[Mapping[str, Any]],
                options: Optional[Mapping[str, Any]] = None) -> str:
    """Write `rows` as one new Parquet part (atomic); returns the part's URL."""
    if not rows:
        raise ValueError("append_rows needs at least one row")
    full = [{**_defaults(), **r} for r in rows]
    table = pa.Table.from_pylist(full, schema=SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    stamp = full[0]["created_at"].strftime("%Y%m%dT%H%M%S%fZ")
    name = f"part-{stamp}-{full[0]['writer_id']}-{uuid.uuid4().hex[:8]}.parquet"
    url = storage.join(dataset, MANIFEST_DIR, name)
    storage.write_bytes(url, buf.getvalue(), options)
    return url


def _defaults() -> dict[str, Any]:
    return {"created_at": now_utc(), "writer_id": writer_id(), "tombstone": False, "meta": "{}",
            "index": None, "modality": "", "split": "", "n_samples": 0, "n_bytes": 0, "sha256": ""}


def read_parts(dataset: str, options: Optional[Mapping[str, Any]] = None) -> pa.Table:
    """Every row of every manifest part (history included), in no particular order."""
    parts = [u for u in storage.listdir(storage.join(dataset, MANIFEST_DIR), options)
             if u.endswith(".parquet")]
    if not parts:
        return SCHEMA.empty_table()

    def read(url: str) -> pa.Table:
        return pq.read_table(io.BytesIO(storage.read_bytes(url, options=options))).cast(SCHEMA)

    with ThreadPoolExecutor(max_workers=min(16, len(parts))) as pool:
        tables = list(pool.map(read, parts))
    return pa.concat_tables(tables)


def visible_rows(table: pa.Table, as_of: Optional[dt.datetime] = None) -> list[dict[str, Any]]:
    """The newest row per shard path (as of a time, if given), tombstoned paths dropped, sorted by path."""
    newest: dict[str, dict[str, Any]] = {}
    for row in table.to_pylist():
        if as_of is not None and row["created_at"] > as_of:
            continue
        cur = newest.get(row["path"])
        if cur is None or (row["created_at"], row["tombstone"]) > (cur["created_at"], cur["tombstone"]):
            newest[row["path"]] = row
    return [newest[p] for p in sorted(newest) if not newest[p]["tombstone"]]


def read_manifest(dataset: str, options: Optional[Mapping[str, Any]] = None,
                  as_of: Optional[dt.datetime] = None) -> list[dict[str, Any]]:
    """The visible shards of a dataset: one dict per shard, sorted by path."""
    return visible_rows(read_parts(dataset, options), as_of)


def tombstone(dataset: str, paths: Sequence[str], options: Optional[Mapping[str, Any]] = None) -> int:
    """Retire shards without rewriting history; returns how many visible shards were retired."""
    visible = {r["path"]: r for r in read_manifest(dataset, options)}
    missing = [p for p in paths if p not in visible]
    if missing:
        raise ValueError(f"not visible in {storage.redact_url(dataset)}: {', '.join(missing)} "
                         "(see `selfsup shards ls`)")
    rows = [{**visible[p], "tombstone": True, "created_at": now_utc(), "writer_id": writer_id()}
            for p in paths]
    if rows:
        append_rows(dataset, rows, options)
    return len(rows)


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Totals per (modality, split): shards, samples, bytes."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        g = groups.setdefault((r["modality"], r["split"]), {
            "modality": r["modality"], "split": r["split"], "shards": 0, "samples": 0, "bytes": 0})
        g["shards"] += 1
        g["samples"] += int(r["n_samples"])
        g["bytes"] += int(r["n_bytes"])
    return [groups[k] for k in sorted(groups)]


def row_meta(row: Mapping[str, Any]) -> dict[str, Any]:
    """The parsed `meta` JSON of a manifest row."""
    try:
        return json.loads(row.get("meta") or "{}")
    except json.JSONDecodeError:
        return {}
