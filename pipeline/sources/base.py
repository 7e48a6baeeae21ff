"""The source interface, its registry and the helpers every source shares.

A source lists lightweight, picklable items (a file path or an array index) in the main process
and encodes one item into tar members in a worker process. Sources are frozen dataclasses: their
repr is part of the write job's digest, which names the shards, so a source's class name and
fields must not change (or the same command would write differently named shards).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Optional, Protocol, Sequence

from selfsup.pipeline.registry import Registry
from selfsup.pipeline.tarindex import encode_label, key_problem

DEFAULT_MAX_ITEM_BYTES = 256 * 2**20  # the largest source file `shards write` reads (--max-item-bytes)


@dataclass(frozen=True)
class Item:
    """One sample to write: its key, what encode() needs, its label and extra metadata."""

    key: str
    ref: Any
    label: Optional[int] = None
    extra: dict[str, Any] = field(default_factory=dict)
    size_hint: int = 0
    fingerprint: str = ""  # changes when the item's content does ("" = unknown); kept in the ledger


@dataclass(frozen=True)
class SourceOptions:
    """The `shards write` settings a source may use; each source reads the ones it has."""

    modality: str                  # image | audio | video: what the shards will hold
    labels: str = "none"           # auto (the source's own labels), none, folder, or a regex
    subset: str = "train"          # Fashion-MNIST subset: train | test
    seed: int = 0                  # for sources that draw random parameters per item


class Source(Protocol):
    """What `selfsup shards write` needs from a source."""

    # the modality the source's files are, or None when it holds any (a folder of media files)
    natural_modality: ClassVar[Optional[str]]

    @classmethod
    def from_options(cls, root: str, options: SourceOptions) -> Source:
        """The source reading the folder `root` with these settings."""
        ...

    @staticmethod
    def detect(root: str) -> bool:
        """Whether the folder `root` looks like this source."""
        ...

    def items(self) -> tuple[list[Item], list[str]]:
        """Every item in a stable order, and the label names (index = class id; empty if unlabeled)."""
        ...

    def encode(self, item: Item, max_bytes: int = DEFAULT_MAX_ITEM_BYTES) -> dict[str, bytes]:
        """The tar members of one item, by extension (runs in a worker process).

        A file larger than `max_bytes` is refused before it is read (`read_file`).
        """
        ...


SOURCES: Registry[type[Source]] = Registry("source type")


def sanitize_key(name: str) -> str:
    """A tar-safe sample key: no dots (they start the extension), no slashes, no spaces."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", name)


def item_name(item: Item) -> str:
    """The name `--include`/`--exclude` match: the file path of a file item, else its key."""
    return str(item.ref) if isinstance(item.ref, str) else item.key


def read_file(path: str, max_bytes: int) -> bytes:
    """A source file's bytes; ValueError naming it, before reading, when it holds more than `max_bytes`."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size <= max_bytes:
            data = f.read(max_bytes + 1)  # one byte more: a file that grew since the check is refused too
            if len(data) <= max_bytes:
                return data
            size = len(data)
    raise ValueError(f"{path} is {size} bytes or more, over the limit of {max_bytes} bytes per item "
                     "(shards write --max-item-bytes): split it, or raise the limit")


def file_fingerprint(path: str) -> tuple[int, str]:
    """(size, fingerprint) of a file: its size and modification time, as `make` and `rsync` compare them."""
    st = os.stat(path)
    return st.st_size, f"{st.st_size}-{st.st_mtime_ns}"


def array_fingerprint(*parts: Any) -> str:
    """16 hex chars from arrays or values (an item made from in-memory data)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(p.tobytes() if hasattr(p, "tobytes") else repr(p).encode())
    return h.hexdigest()


def disambiguated_key(item: Item) -> str:
    """`<key>-<8 hex of the item's reference>`: the key of an item whose key another item shares."""
    return f"{item.key}-{hashlib.blake2b(str(item.ref).encode('utf-8'), digest_size=4).hexdigest()}"


@dataclass
class KeyReport:
    """What `unique_keys` changed: items renamed (name, new key) and items left out (name, reason)."""

    renamed: list[tuple[str, str]] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)


def unique_keys(items: Sequence[Item]) -> tuple[list[Item], KeyReport]:
    """The items with sample keys unique by construction, and what that took.

    Items whose key no other item has keep it (so sources without collisions write exactly as
    before). Every item of a group sharing a key (`x.jpg` beside `x.png`; `a.b.jpg` beside
    `a_b.jpg` once sanitized) gets `disambiguated_key`, which depends on its own reference only,
    so reruns give the same keys. An item whose key is not a valid sample key, or that still
    collides after that, is left out and reported.
    """
    report = KeyReport()
    counts: dict[str, int] = {}
    for it in items:
        counts[it.key] = counts.get(it.key, 0) + 1
    out: list[Item] = []
    owner: dict[str, str] = {}
    for it in items:
        key = it.key if counts[it.key] == 1 else disambiguated_key(it)
        problem = key_problem(key)
        if problem is None and key in owner:
            problem = f"sample key {key!r} is already used by {owner[key]}"
        if problem is not None:
            report.rejected.append((item_name(it), problem))
            continue
        owner[key] = item_name(it)
        if key != it.key:
            it = replace(it, key=key)
            report.renamed.append((item_name(it), key))
        out.append(it)
    return out, report


def with_label(members: dict[str, bytes], item: Item, label_names: Sequence[str]) -> dict[str, bytes]:
    """Add `.cls` and `.json` members for a labeled item."""
    extra = dict(item.extra)
    if item.label is not None:
        members["cls"] = encode_label(item.label)
        if label_names:
            extra["label_name"] = label_names[item.label]
    if extra:
        members["json"] = json.dumps(extra, sort_keys=True).encode("utf-8")
    return members


def apply_filters(items: list[Item], include: Optional[str], exclude: Optional[str],
                  name: Callable[[Item], str] = item_name) -> list[Item]:
    """Keep items whose name matches `include` and not `exclude` (regexes, searched)."""
    if include:
        inc = re.compile(include)
        items = [it for it in items if inc.search(name(it))]
    if exclude:
        exc = re.compile(exclude)
        items = [it for it in items if not exc.search(name(it))]
    return items
