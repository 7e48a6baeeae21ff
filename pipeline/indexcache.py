"""IndexCache: a batch maker's shard indexes, least recently used first out, bounded in bytes.

A count bound alone is no bound: a 30,000-sample index is megabytes, so 256 of them could fill
a stream's memory with indexes of short audio clips. Each entry is charged its `nbytes`
(PackedIndex), and entries are dropped, oldest use first, until the total fits the budget.
An index larger than the whole budget is returned but not kept (the next use reads it again).
"""
from __future__ import annotations

import collections
from typing import Callable, Generic, Protocol, TypeVar

DEFAULT_INDEX_CACHE_BYTES = 64 * 2**20  # per BatchMaker (one per stream)


class Sized(Protocol):
    """What the cache holds: anything that says how many bytes it takes."""

    @property
    def nbytes(self) -> int: ...


V = TypeVar("V", bound=Sized)


class IndexCache(Generic[V]):
    """`cache(key)` returns load(key), kept while the entries' `nbytes` total stays within `max_bytes`."""

    def __init__(self, load: Callable[[int], V], max_bytes: int = DEFAULT_INDEX_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"index cache budget {max_bytes} bytes is negative; give 0 (no cache) or more")
        self.load, self.max_bytes = load, max_bytes
        self._entries: collections.OrderedDict[int, tuple[V, int]] = collections.OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = self.evictions = 0

    def __call__(self, key: int) -> V:
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return found[0]
        self.misses += 1
        value = self.load(key)
        size = int(value.nbytes)
        if size <= self.max_bytes:
            while self.nbytes + size > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.nbytes -= dropped
                self.evictions += 1
            self._entries[key] = (value, size)
            self.nbytes += size
        return value

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: int) -> bool:
        return key in self._entries

    def stats(self) -> dict[str, int]:
        """Entries, bytes held, the budget, hits, misses and evictions so far."""
        return {"entries": len(self._entries), "bytes": self.nbytes, "max_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions}
