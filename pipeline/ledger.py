"""The ledger: which source items each shard holds, beside the manifest under `<dataset>/_ledger/`.

`<dataset>/_ledger/<shard>.json` names, for one shard, the scope of the write that made it (a
digest of the source and the settings that choose and encode its items) and, per item, its name
(the file path, or the key of a non-file item), sample key and fingerprint. It is written after
the shard and its index and before the manifest row, so every visible shard written since has
one; shards written by older versions have none. A rerun of `shards write` reads the ledgers of
the visible shards and writes only the items the dataset lacks; `shards ls --items` lists them.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from selfsup.pipeline import storage

LEDGER_DIR = "_ledger"
FORMAT = "selfsup-ledger/1"


@dataclass(frozen=True)
class LedgerEntry:
    """One source item held by a shard."""

    name: str
    key: str
    fingerprint: str
    shard: str
    scope: str


@dataclass
class Holdings:
    """What the visible shards of a dataset hold, from their ledgers."""

    entries: list[LedgerEntry] = field(default_factory=list)
    without_ledger: list[str] = field(default_factory=list)  # visible shards written before ledgers

    def in_scope(self, scope: str) -> dict[str, LedgerEntry]:
        """Held items written by a job of this scope, by name."""
        return {e.name: e for e in self.entries if e.scope == scope}

    def keys(self) -> dict[str, str]:
        """Every sample key held, and the name of the item holding it."""
        return {e.key: e.name for e in self.entries}


def ledger_url(dataset: str, shard_path: str) -> str:
    """Where the ledger of the shard `shard_path` (relative, `….tar`) lives."""
    return storage.join(dataset, LEDGER_DIR, shard_path.rsplit(".", 1)[0] + ".json")


def write_ledger(dataset: str, shard_path: str, scope: str, entries: Sequence[tuple[str, str, str]],
                 options: Optional[Mapping[str, Any]] = None) -> None:
    """Record the (name, key, fingerprint) of every item a shard holds (atomic; before its manifest row)."""
    doc = {"format": FORMAT, "shard": shard_path, "scope": scope,
           "items": [list(e) for e in entries]}
    storage.write_text(ledger_url(dataset, shard_path), json.dumps(doc, separators=(",", ":")), options)


def read_shard_ledger(dataset: str, shard_path: str,
                      options: Optional[Mapping[str, Any]] = None) -> Optional[list[LedgerEntry]]:
    """The items one shard holds, or None when it has no ledger; ValueError naming it when malformed."""
    try:
        doc = json.loads(storage.read_bytes(ledger_url(dataset, shard_path), options=options))
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise ValueError(f"ledger of {shard_path} is not valid JSON ({e}): delete it to treat the shard "
                         "as written before ledgers") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("items"), list):
        raise ValueError(f"ledger of {shard_path} is not a {FORMAT} document")
    scope = str(doc.get("scope", ""))
    try:
        return [LedgerEntry(str(n), str(k), str(f), shard_path, scope) for n, k, f in doc["items"]]
    except (TypeError, ValueError):
        raise ValueError(f"ledger of {shard_path}: an item is not [name, key, fingerprint]") from None


def read_holdings(dataset: str, rows: Sequence[Mapping[str, Any]],
                  options: Optional[Mapping[str, Any]] = None) -> Holdings:
    """The items held by the shards of `rows` (visible manifest rows of `dataset`)."""
    paths = [str(r["path"]) for r in rows if not r.get("external")]  # added tars (`shards add`) have no ledger
    out = Holdings()
    if not paths:
        return out
    with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
        found = list(pool.map(lambda p: read_shard_ledger(dataset, p, options), paths))
    for path, entries in zip(paths, found):
        if entries is None:
            out.without_ledger.append(path)
        else:
            out.entries.extend(entries)
    return out
