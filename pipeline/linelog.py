"""Append-only line files on object stores: one small object per line, read back as one file.

An object store cannot append, and rewriting a file per line makes a long run's metrics cost
O(lines²) bytes. So the lines of `<url>` on s3:// and gs:// live beside it as objects

    <url>.parts/p-000000000042      one line (or a few), claimed by a conditional create
    <url>.parts/c-00000000          lines [0, CHUNK) merged, written once the chunk is full

Numbers are claimed with `write_if_absent`, so concurrent appenders never overwrite one
another; a writer only tries n after seeing n-1 taken, so the numbers have no gaps and their
order is the order of the appends. The writer that fills a chunk merges its lines into one
object and deletes the parts, which keeps reads at about lines/CHUNK + CHUNK objects. A file
written whole before (by an older selfsup) is moved into the log as its first object.

`storage.read_bytes`, `exists`, `size` and `delete` treat `<url>` as the logical file, so
readers never see the layout. Local files stay plain appends (storage.append_line).
"""
from __future__ import annotations

import logging
import re
import threading
from typing import Any, Mapping, Optional

from selfsup.pipeline import storage

log = logging.getLogger(__name__)

SUFFIX = ".parts"
CHUNK = 64  # lines merged into one object
BASE = "a-base"  # a whole file that existed before the log; sorts before every chunk and part
_NAME = re.compile(r"^(?:p-(\d{12})|c-(\d{8})|(a-base))$")
_next: dict[str, int] = {}  # url → the next number this process expects to be free
_next_lock = threading.Lock()


def folder(url: str) -> str:
    """The folder holding the objects of the line file `url`."""
    return url.rstrip("/") + SUFFIX


def append(url: str, text: str, options: Optional[Mapping[str, Any]] = None) -> None:
    """Append `text` (whole lines) to the line file `url` with one small conditional create."""
    data = text.encode("utf-8")
    with _next_lock:
        n = _next.get(url)
    if n is None:
        objects, n = _scan(url, options)
        if not objects:
            _adopt_whole_file(url, options)
    for attempt in range(200):
        if storage.write_if_absent(_part(url, n), data, options):
            with _next_lock:
                _next[url] = n + 1
            if (n + 1) % CHUNK == 0:
                _merge(url, n // CHUNK, options)
            return
        # another appender took n: jump to the end (one listing), or step on under a tight race
        n = max(n + 1, _scan(url, options)[1]) if attempt % 2 == 0 else n + 1
    raise OSError(f"could not append to {storage.redact_url(url)}: too much contention")


def read(url: str, options: Optional[Mapping[str, Any]] = None) -> Optional[bytes]:
    """The whole line file, or None when `url` has no log."""
    for _ in range(5):
        objects = _scan(url, options)[0]
        if not objects:
            return None
        fs, _ = storage.filesystem(url, options)
        paths = [storage.filesystem(u, options)[1] for u in objects]
        try:
            blobs = storage.retrying(lambda: fs.cat(paths, on_error="raise"), url)
        except FileNotFoundError:  # merged into a chunk meanwhile: list again
            continue
        return b"".join(blobs[p] for p in paths) if isinstance(blobs, dict) else bytes(blobs)
    raise OSError(f"{storage.redact_url(url)}: the line file kept changing while being read")


def exists(url: str, options: Optional[Mapping[str, Any]] = None) -> bool:
    """Whether `url` has a log."""
    return bool(_scan(url, options)[0])


def delete(url: str, options: Optional[Mapping[str, Any]] = None) -> None:
    """Remove the log of `url` (if any)."""
    storage.delete(folder(url), recursive=True, options=options)
    with _next_lock:
        _next.pop(url, None)


def _adopt_whole_file(url: str, options: Optional[Mapping[str, Any]]) -> None:
    """Move a whole file written before the log into it as its first object, then remove the original."""
    fs, path = storage.filesystem(url, options)
    try:
        data = storage.retrying(lambda: fs.cat_file(path), url)
    except FileNotFoundError:
        return
    storage.write_if_absent(storage.join(folder(url), BASE), data, options)
    storage.retrying(lambda: fs.rm(path), url)


def _part(url: str, n: int) -> str:
    return storage.join(folder(url), f"p-{n:012d}")


def _chunk(url: str, c: int) -> str:
    return storage.join(folder(url), f"c-{c:08d}")


def _scan(url: str, options: Optional[Mapping[str, Any]]) -> tuple[list[str], int]:
    """(the log's objects in line order, the next free part number)."""
    base: list[str] = []
    chunks: dict[int, str] = {}
    parts: dict[int, str] = {}
    for entry in storage.listdir(folder(url), options):
        m = _NAME.match(entry.rsplit("/", 1)[-1])
        if not m:
            continue
        if m.group(1):
            parts[int(m.group(1))] = entry
        elif m.group(2):
            chunks[int(m.group(2))] = entry
        else:
            base.append(entry)
    items = [(c * CHUNK, u) for c, u in chunks.items()]
    items += [(n, u) for n, u in parts.items() if n // CHUNK not in chunks]
    end = max([(c + 1) * CHUNK for c in chunks] + [n + 1 for n in parts] + [0])
    return base + [u for _, u in sorted(items)], end


def _merge(url: str, c: int, options: Optional[Mapping[str, Any]]) -> None:
    """Merge the full chunk c into one object and delete its parts (best effort: the lines are safe)."""
    try:
        fs, _ = storage.filesystem(url, options)
        paths = [storage.filesystem(_part(url, n), options)[1] for n in range(c * CHUNK, (c + 1) * CHUNK)]
        blobs = storage.retrying(lambda: fs.cat(paths, on_error="raise"), url)
        storage.write_if_absent(_chunk(url, c), b"".join(blobs[p] for p in paths), options)
        storage.retrying(lambda: fs.rm(paths), url)
    except (OSError, KeyError) as e:
        log.warning("could not merge lines of %s (%s); they stay as parts", storage.redact_url(url), e)
