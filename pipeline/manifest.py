"""The manifest: append-only Parquet parts under `<dataset>/_manifest/`, one row per shard event.

A shard becomes visible only when its row lands, after its bytes and index are fully written.
Writers never rewrite a part, so concurrent writers lose nothing. Readers union every part,
keep the newest row per shard path, and drop paths whose newest row is a tombstone.

"Newest" is decided by part order, never by a writer's clock: each part is created as
`part-<12-digit number>.parquet` by a conditional create of the next free number, so a part's
number is above every part its writer could see (a tombstone always follows the row it retires),
and within a part later rows win. Parts of older manifests (`part-<timestamp>-<writer>.parquet`,
and any part on a store without conditional creates) come first, ordered by `created_at` as before.

A row's `path` and `index` are relative paths inside the dataset, except in rows marked
`external` (`selfsup shards add`: third-party tars read in place): there `path` is the tar's
absolute URL, and `index` is either a path inside the dataset or an absolute URL beside the tar.
An absolute location must be a plain one (`s3://`, `gs://`, `file://`, `memory://` or an absolute
local path; no `..`, credentials, query or fsspec chaining) and is allowed in external rows only.
`locate` resolves both kinds; a reader never joins a row's path itself.

A part that cannot be read (empty, not Parquet, wrong schema, a shard path that leaves the
dataset) is named in a `BadPart`: readers that train raise `ManifestError` naming it; `shards ls`
and `shards verify` report it and go on with the readable parts.
"""
from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import posixpath
import re
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from selfsup.pipeline import storage

log = logging.getLogger(__name__)
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
    ("external", pa.bool_()),       # path (and maybe index) are absolute URLs outside the dataset
])
COLUMNS = [f.name for f in SCHEMA]
OPTIONAL = {"external": False}  # columns that parts written before them lack, and their value there
EXTERNAL_PROTOCOLS = ("s3", "gs", "file", "memory")
SEQ_PART = re.compile(r"^part-(\d{12})\.parquet$")  # a numbered part; anything else is a legacy part
MAX_CLAIMS = 1000  # conditional creates tried before giving up (each lost race moves one number on)


class ManifestError(ValueError):
    """The manifest has parts that cannot be read; the message names each."""


@dataclass(frozen=True)
class BadPart:
    """A manifest part that cannot be read, and why."""

    url: str
    reason: str

    def describe(self) -> str:
        """'<url>: <reason>' with credentials redacted."""
        return f"{storage.redact_url(self.url)}: {self.reason}"


def writer_id() -> str:
    """An id naming this writing process (host, pid, random suffix)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def now_utc() -> dt.datetime:
    """The current time, UTC, microsecond precision."""
    return dt.datetime.now(dt.timezone.utc)


def append_rows(dataset: str, rows: Sequence[Mapping[str, Any]],
                options: Optional[Mapping[str, Any]] = None) -> str:
    """Write `rows` as one new Parquet part (atomic, numbered after every visible part); returns its URL."""
    if not rows:
        raise ValueError("append_rows needs at least one row")
    full = [{**_defaults(), **r} for r in rows]
    for r in full:
        check_row_paths(r)
    table = pa.Table.from_pylist(full, schema=SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    data = buf.getvalue()
    folder = storage.join(dataset, MANIFEST_DIR)
    n = next_part_number(storage.listdir(folder, options))
    for _ in range(MAX_CLAIMS):
        url = storage.join(folder, f"part-{n:012d}.parquet")
        try:
            if storage.write_if_absent(url, data, options):  # a lost reply is settled there, by read-back
                return url
        except ValueError:  # a store without conditional creates: a legacy part, ordered by clock
            return _append_legacy(folder, full[0], data, options)
        n += 1  # another writer took this number: the next one is still after all we saw
    raise RuntimeError(f"could not claim a manifest part number under {storage.redact_url(folder)} "
                       f"after {MAX_CLAIMS} tries (too many concurrent writers?)")


def next_part_number(urls: Sequence[str]) -> int:
    """One past the highest numbered part among `urls` (0 when there is none)."""
    numbers = [int(m.group(1)) for m in (SEQ_PART.match(posixpath.basename(u)) for u in urls) if m]
    return max(numbers, default=-1) + 1


def _append_legacy(folder: str, first: Mapping[str, Any], data: bytes,
                   options: Optional[Mapping[str, Any]]) -> str:
    stamp = first["created_at"].strftime("%Y%m%dT%H%M%S%fZ")
    url = storage.join(folder, f"part-{stamp}-{first['writer_id']}-{uuid.uuid4().hex[:8]}.parquet")
    storage.write_bytes(url, data, options)
    return url


def _defaults() -> dict[str, Any]:
    return {"created_at": now_utc(), "writer_id": writer_id(), "tombstone": False, "meta": "{}",
            "index": None, "modality": "", "split": "", "n_samples": 0, "n_bytes": 0, "sha256": "",
            "external": False}


def is_safe_relpath(path: Any) -> bool:
    """Whether `path` names a file inside the dataset: relative, no scheme, no '..', no empty part."""
    if not isinstance(path, str) or not path or "://" in path or "\\" in path or "\x00" in path:
        return False
    parts = path.split("/")
    return not path.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def is_safe_external_url(url: Any) -> bool:
    """Whether `url` is a plain absolute location of a shard outside any dataset (see the module doc)."""
    if not isinstance(url, str) or not url or any(c in url for c in "\\\x00?#@") or "::" in url:
        return False
    if any(ord(c) < 32 for c in url):
        return False
    if "://" in url:
        scheme, rest = url.split("://", 1)
        if storage.protocol_of(url) not in EXTERNAL_PROTOCOLS or scheme != scheme.lower():
            return False
        if storage.protocol_of(url) == "file" and not rest.startswith("/"):
            return False  # file://relative would resolve against the reader's working directory
        path = rest[1:] if storage.protocol_of(url) == "file" else rest
    elif url.startswith("/"):
        path = url[1:]
    else:
        return False
    return bool(path) and all(p not in ("", ".", "..") for p in path.split("/"))


def check_row_paths(row: Mapping[str, Any]) -> None:
    """Raise ValueError unless the row's shard and index paths stay inside the dataset (or, in an
    external row, are plain absolute URLs: see the module doc)."""
    external = bool(row.get("external"))
    for col in ("path", "index"):
        value = row.get(col)
        if col == "index" and value is None:
            continue
        if is_safe_relpath(value) and not (external and col == "path"):
            continue
        if external and is_safe_external_url(value):
            continue
        if external:
            raise ValueError(f"manifest row {col} {value!r} of an external shard is neither a plain absolute URL "
                             "(s3://, gs://, file://, memory://, /abs/path; no '..', credentials or query)"
                             + ("" if col == "path" else " nor a relative path inside the dataset"))
        raise ValueError(f"manifest row {col} {value!r} is not a relative path inside the dataset")


def locate(dataset: str, row: Mapping[str, Any], col: str = "path") -> str:
    """The full URL of a row's shard (`col="path"`) or index (`col="index"`), resolved against `dataset`."""
    value = str(row[col])
    if row.get("external") and is_safe_external_url(value):
        return value
    return storage.join(storage.full_url(dataset), value)


def tar_urls(dataset: str, split: str, options: Optional[Mapping[str, Any]] = None) -> list[str]:
    """The URLs of the visible tars of one split, for other readers (`ray.data.read_webdataset(urls)`):
    no `.idx` files, external tars included. FileNotFoundError when `dataset` holds no manifest,
    ValueError when it has no shard of `split`."""
    require_dataset(dataset, options)
    rows = [r for r in read_manifest(dataset, options) if r["split"] == split]
    if not rows:
        raise ValueError(f"no visible shards with split {split!r} in {storage.redact_url(dataset)} "
                         "(see `selfsup shards ls`)")
    return [locate(dataset, r) for r in rows]


def part_urls(dataset: str, options: Optional[Mapping[str, Any]] = None) -> list[str]:
    """The URLs of every manifest part, in manifest order: legacy parts by name, then numbered parts by number."""
    parts = [u for u in storage.listdir(storage.join(dataset, MANIFEST_DIR), options) if u.endswith(".parquet")]

    def order(url: str) -> tuple[int, int, str]:
        m = SEQ_PART.match(posixpath.basename(url))
        return (1, int(m.group(1)), "") if m else (0, 0, posixpath.basename(url))

    return sorted(parts, key=order)


def require_dataset(dataset: str, options: Optional[Mapping[str, Any]] = None) -> None:
    """FileNotFoundError naming the location when it holds no manifest part (a typo, the wrong bucket)."""
    if not part_urls(dataset, options):
        raise FileNotFoundError(f"no dataset at {storage.redact_url(dataset)}: it has no {MANIFEST_DIR}/ parts "
                                "(check the location; `selfsup shards write SRC DEST` makes a dataset)")


def read_part(url: str, options: Optional[Mapping[str, Any]] = None) -> pa.Table:
    """One part as a table of SCHEMA; ValueError saying what is wrong when it is not a valid part."""
    data = storage.read_bytes(url, options=options)
    if not data:
        raise ValueError("empty file (0 bytes)")
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"not a Parquet file ({e})") from None
    missing = [c for c in COLUMNS if c not in table.column_names and c not in OPTIONAL]
    if missing:
        raise ValueError(f"lacks column(s) {', '.join(missing)}")
    for name, value in OPTIONAL.items():  # a part written before the column existed
        if name not in table.column_names:
            table = table.append_column(name, pa.array([value] * len(table), SCHEMA.field(name).type))
    try:
        table = table.select(COLUMNS).cast(SCHEMA)
    except (pa.ArrowException, ValueError) as e:
        raise ValueError(f"columns of the wrong type ({e})") from None
    table = table.set_column(COLUMNS.index("external"), "external",
                             table["external"].fill_null(False))
    for row in table.select(["path", "index", "external"]).to_pylist():
        check_row_paths(row)
    return table


def scan_parts(dataset: str, options: Optional[Mapping[str, Any]] = None) -> tuple[pa.Table, list[BadPart]]:
    """Every row of every readable part in manifest order (history included), and the parts that are not."""
    urls = part_urls(dataset, options)
    if not urls:
        return SCHEMA.empty_table(), []

    def read(url: str) -> pa.Table | BadPart:
        try:
            return read_part(url, options)
        except ValueError as e:
            return BadPart(url, str(e))

    with ThreadPoolExecutor(max_workers=min(16, len(urls))) as pool:
        results = list(pool.map(read, urls))
    bad = [r for r in results if isinstance(r, BadPart)]
    legacy = [r for u, r in zip(urls, results) if isinstance(r, pa.Table) and not SEQ_PART.match(posixpath.basename(u))]
    numbered = [r for u, r in zip(urls, results) if isinstance(r, pa.Table) and SEQ_PART.match(posixpath.basename(u))]
    if legacy:  # clock order among legacy parts, as older versions read them (a tie: the tombstone last)
        legacy = [pa.concat_tables(legacy).sort_by([("created_at", "ascending"), ("tombstone", "ascending")])]
    tables = legacy + numbered
    return (pa.concat_tables(tables) if tables else SCHEMA.empty_table()), bad


def raise_bad_parts(bad: Sequence[BadPart]) -> None:
    """ManifestError naming every bad part and what to do, if there is any."""
    if bad:
        raise ManifestError("unreadable manifest part(s): " + "; ".join(b.describe() for b in bad)
                            + " — move or delete them (`selfsup shards ls` lists the readable shards)")


def read_parts(dataset: str, options: Optional[Mapping[str, Any]] = None) -> pa.Table:
    """Every row of every manifest part (history included), in manifest order; ManifestError on a bad part."""
    table, bad = scan_parts(dataset, options)
    raise_bad_parts(bad)
    return table


def visible_rows(table: pa.Table, as_of: Optional[dt.datetime] = None) -> list[dict[str, Any]]:
    """The last row per shard path in manifest order (among rows created by `as_of`, if given),
    tombstoned paths dropped, sorted by path."""
    newest: dict[str, dict[str, Any]] = {}
    for row in table.to_pylist():
        if as_of is not None and row["created_at"] > as_of:
            continue
        newest[row["path"]] = row
    return [newest[p] for p in sorted(newest) if not newest[p]["tombstone"]]


def read_manifest(dataset: str, options: Optional[Mapping[str, Any]] = None,
                  as_of: Optional[dt.datetime] = None) -> list[dict[str, Any]]:
    """The visible shards of a dataset: one dict per shard, sorted by path; ManifestError on a bad part."""
    return visible_rows(read_parts(dataset, options), as_of)


def read_manifest_lenient(dataset: str, options: Optional[Mapping[str, Any]] = None
                          ) -> tuple[list[dict[str, Any]], list[BadPart]]:
    """The visible shards of the readable parts, and the parts that could not be read (for ls and verify)."""
    table, bad = scan_parts(dataset, options)
    for b in bad:
        log.warning("skipping unreadable manifest part %s", b.describe())
    return visible_rows(table), bad


def tombstone(dataset: str, paths: Sequence[str], options: Optional[Mapping[str, Any]] = None) -> int:
    """Retire shards without rewriting history; returns how many visible shards were retired."""
    visible = {r["path"]: r for r in read_manifest(dataset, options)}
    missing = [p for p in paths if p not in visible]
    if missing:
        raise ValueError(f"not visible in {storage.redact_url(dataset)}: {', '.join(missing)} "
                         "(see `selfsup shards ls`)")
    rows = [{**visible[p], "tombstone": True, "created_at": now_utc(), "writer_id": writer_id()}
            for p in dict.fromkeys(paths)]
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
        g["samples"] += int(r["n_samples"] or 0)
        g["bytes"] += int(r["n_bytes"] or 0)
    return [groups[k] for k in sorted(groups)]


def row_meta(row: Mapping[str, Any]) -> dict[str, Any]:
    """The parsed `meta` JSON of a manifest row."""
    try:
        meta = json.loads(row.get("meta") or "{}")
    except json.JSONDecodeError:
        return {}
    return meta if isinstance(meta, dict) else {}
