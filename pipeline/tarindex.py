"""WebDataset tar shards and their indexes.

A shard is a plain tar whose members are named `<key>.<ext>`; members sharing a key form one
sample. Beside it, `<shard>.idx` (JSON) records for each sample its key, the byte range
[start, end) covering all its members (tar headers included), and for each member its data
offset, size and CRC-32. Samples i..j are therefore one ranged read: [start[i], end[j]).
Members are returned as raw bytes (or read-only views of them, see pipeline/buffers.py); nothing is
ever unpickled or executed.
"""
from __future__ import annotations

import io
import json
import tarfile
import zlib
from dataclasses import dataclass
from typing import IO, Any, Iterator, Mapping, Optional, Union

import numpy as np

from selfsup.pipeline import storage

INDEX_FORMAT = "selfsup-index/1"
Members = dict[str, bytes]


def split_name(name: str) -> tuple[str, str]:
    """`dir/000123.jpg` → (`dir/000123`, `jpg`): the key ends at the basename's first dot."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


def key_problem(key: str) -> Optional[str]:
    """Why `key` cannot name a sample in a tar (it would split or escape), or None when it can."""
    if not key:
        return "the key is empty"
    if "." in key[key.rfind("/") + 1:]:
        return f"key {key!r} has a dot, which would start the member's extension"
    if key.startswith("/") or any(part in ("", ".", "..") for part in key.split("/")):
        return f"key {key!r} is not a relative name (leading '/', empty, '.' or '..' part)"
    if any(ord(c) < 32 or c in "\\\x7f" for c in key):
        return f"key {key!r} holds a control character or backslash"
    return None


@dataclass(frozen=True)
class ShardIndex:
    """Byte layout of one shard: per sample key, [start, end) and members {ext: (offset, size, crc)}."""

    shard: str
    keys: tuple[str, ...]
    starts: tuple[int, ...]
    ends: tuple[int, ...]
    members: tuple[Mapping[str, tuple[int, int, int]], ...]

    def __len__(self) -> int:
        return len(self.keys)

    def to_json(self) -> str:
        """The index as JSON text."""
        return json.dumps({
            "format": INDEX_FORMAT, "shard": self.shard, "n_samples": len(self.keys),
            "keys": list(self.keys), "starts": list(self.starts), "ends": list(self.ends),
            "members": [{ext: list(v) for ext, v in m.items()} for m in self.members],
        }, separators=(",", ":"))

    @staticmethod
    def from_json(text: str | bytes, where: str = "index") -> "ShardIndex":
        """Parse an index; raises ValueError naming `where` and the bad field when it is not one."""
        try:
            d = json.loads(text)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where} is not a valid selfsup shard index: {e}") from None
        problem = index_problem(d)
        if problem:
            raise ValueError(f"{where} is not a valid selfsup shard index: {problem}")
        return ShardIndex(
            shard=d["shard"], keys=tuple(d["keys"]), starts=tuple(d["starts"]), ends=tuple(d["ends"]),
            members=tuple({ext: (v[0], v[1], v[2]) for ext, v in m.items()} for m in d["members"]),
        )

    def span(self, lo: int, hi: int) -> tuple[int, int]:
        """Byte range [start, end) holding samples lo..hi-1."""
        return self.starts[lo], self.ends[hi - 1]


class _PackedKeys:
    """The keys of a PackedIndex, decoded one at a time from one UTF-8 blob."""

    def __init__(self, blob: bytes, bounds: np.ndarray) -> None:
        self.blob, self.bounds = blob, bounds  # bounds: [n + 1] int64 offsets into blob

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, i: int) -> str:
        return self.blob[self.bounds[i]: self.bounds[i + 1]].decode("utf-8")


class _PackedMembers:
    """The members of a PackedIndex, one sample's {ext: (offset, size, crc)} built on request."""

    def __init__(self, layouts: tuple[tuple[str, ...], ...], layout: np.ndarray, first: np.ndarray,
                 table: np.ndarray) -> None:
        self.layouts, self.layout, self.first, self.table = layouts, layout, first, table

    def __len__(self) -> int:
        return len(self.layout)

    def __getitem__(self, i: int) -> dict[str, tuple[int, int, int]]:
        rows = self.table[self.first[i]: self.first[i + 1]].tolist()  # [M, 3] offset, size, crc
        return {ext: (r[0], r[1], r[2]) for ext, r in zip(self.layouts[self.layout[i]], rows)}


class PackedIndex:
    """A ShardIndex held in a few numpy arrays (what BatchMaker caches): the same lookups, ~6× fewer bytes.

    A parsed ShardIndex spends ~570 bytes of Python objects per sample (a dict of tuples of ints
    each; 17 MB for 30,000 samples); here ~90 bytes a sample (2.7 MB), and
    `nbytes` says how much it holds, so a cache can be bounded in bytes.
    """

    def __init__(self, index: ShardIndex) -> None:
        n = len(index)
        self.shard = index.shard
        encoded = [k.encode("utf-8") for k in index.keys]
        bounds = np.zeros(n + 1, np.int64)  # [n + 1]
        np.cumsum([len(k) for k in encoded], out=bounds[1:])
        self.keys = _PackedKeys(b"".join(encoded), bounds)
        self.starts = np.asarray(index.starts, np.int64)  # [n]
        self.ends = np.asarray(index.ends, np.int64)  # [n]
        layouts: dict[tuple[str, ...], int] = {}
        layout = np.array([layouts.setdefault(tuple(m), len(layouts)) for m in index.members], np.int32)  # [n]
        first = np.zeros(n + 1, np.int64)  # [n + 1]: sample i's members are table rows first[i]..first[i+1]-1
        np.cumsum([len(m) for m in index.members], out=first[1:])
        table = np.array([v for m in index.members for v in m.values()], np.int64).reshape(-1, 3)  # [M, 3]
        self.members = _PackedMembers(tuple(layouts), layout, first, table)

    def __len__(self) -> int:
        return len(self.starts)

    def span(self, lo: int, hi: int) -> tuple[int, int]:
        """Byte range [start, end) holding samples lo..hi-1."""
        return int(self.starts[lo]), int(self.ends[hi - 1])

    @property
    def nbytes(self) -> int:
        """Bytes this index holds (arrays, key text, object headers): what a byte-bounded cache counts."""
        m = self.members
        arrays = (self.keys.bounds, self.starts, self.ends, m.layout, m.first, m.table)
        layouts = sum(64 + sum(56 + len(e) for e in names) for names in m.layouts)
        return sum(a.nbytes + 112 for a in arrays) + len(self.keys.blob) + 33 + layouts + 512 + len(self.shard)


AnyIndex = Union[ShardIndex, PackedIndex]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def index_problem(d: Any) -> Optional[str]:
    """What makes the parsed JSON `d` not a shard index (a missing field, a wrong type), or None."""
    if not isinstance(d, dict):
        return f"expected a JSON object, found {type(d).__name__}"
    if d.get("format") != INDEX_FORMAT:
        return f"format is {d.get('format')!r}, expected {INDEX_FORMAT!r}"
    for name, kind in (("shard", str), ("n_samples", int), ("keys", list), ("starts", list), ("ends", list),
                       ("members", list)):
        if name not in d:
            return f"field {name!r} is missing"
        if not isinstance(d[name], kind) or isinstance(d[name], bool):
            return f"field {name!r} is {type(d[name]).__name__}, expected {kind.__name__}"
    n = d["n_samples"]
    if not len(d["keys"]) == len(d["starts"]) == len(d["ends"]) == len(d["members"]) == n:
        return "index arrays disagree in length"
    if not all(isinstance(k, str) and k for k in d["keys"]):
        return "a key is not a non-empty string"
    if not all(_is_int(a) and _is_int(b) and a <= b for a, b in zip(d["starts"], d["ends"])):
        return "a sample's [start, end) is not a pair of ordered non-negative integers"
    if any(a < b for a, b in zip(d["starts"][1:], d["ends"])):
        return "samples overlap or are out of order"
    for key, m, start, end in zip(d["keys"], d["members"], d["starts"], d["ends"]):
        if not isinstance(m, dict) or not m:
            return f"members of {key!r} are not a non-empty object"
        for ext, v in m.items():
            if not (isinstance(v, list) and len(v) == 3 and all(_is_int(x) for x in v)):
                return f"member {key}.{ext} is not [offset, size, crc] of non-negative integers"
            if v[0] < start or v[0] + v[1] > end:
                return f"member {key}.{ext} lies outside its sample's bytes [{start}, {end})"
    return None


def index_tar(fileobj: IO[bytes], shard: str) -> ShardIndex:
    """Scan a tar (seekable) and build its index, grouping consecutive members by key."""
    keys: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    members: list[dict[str, tuple[int, int, int]]] = []
    with tarfile.open(fileobj=fileobj, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, ext = split_name(info.name)
            data_end = info.offset_data + info.size
            padded_end = data_end + (-info.size % 512)
            fileobj_pos = fileobj.tell()
            fileobj.seek(info.offset_data)
            crc = zlib.crc32(fileobj.read(info.size))
            fileobj.seek(fileobj_pos)
            if not keys or keys[-1] != key:
                keys.append(key)
                starts.append(info.offset)
                ends.append(padded_end)
                members.append({})
            ends[-1] = padded_end
            members[-1][ext] = (info.offset_data, info.size, crc)
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})[:3]
        raise ValueError(f"shard {shard}: members of sample(s) {dup} are not contiguous")
    return ShardIndex(shard, tuple(keys), tuple(starts), tuple(ends), tuple(members))


def members_from_range(index: AnyIndex, lo: int, hi: int, data: Union[bytes, memoryview],
                       check_crc: bool = False, views_from: Optional[int] = None) -> list[tuple[str, Members]]:
    """Slice samples lo..hi-1 out of `data`, the bytes of index.span(lo, hi).

    Members are bytes; with `views_from`, members of that many bytes or more are read-only
    memoryviews of `data` instead (no copy; see pipeline/buffers.py).
    """
    base = index.span(lo, hi)[0]
    if views_from is not None:
        data = memoryview(data)
    out = []
    for i in range(lo, hi):
        sample: Members = {}
        for ext, (off, size, crc) in index.members[i].items():
            blob: Any = data[off - base: off - base + size]
            if isinstance(blob, memoryview) and (views_from is None or size < views_from):
                blob = blob.tobytes()
            if check_crc and zlib.crc32(blob) != crc:
                raise ValueError(f"{index.shard}: member {index.keys[i]}.{ext} fails its CRC")
            sample[ext] = blob
        out.append((index.keys[i], sample))
    return out


def read_samples(shard_url: str, index: ShardIndex, lo: int, hi: int,
                 options: Optional[Mapping[str, Any]] = None) -> list[tuple[str, Members]]:
    """Samples lo..hi-1 of a shard with one ranged read."""
    start, end = index.span(lo, hi)
    data = storage.read_bytes(shard_url, start, end, options)
    return members_from_range(index, lo, hi, data)


def iter_tar(stream: IO[bytes]) -> Iterator[tuple[str, Members]]:
    """Scan a tar stream (not seekable) and yield (key, {ext: bytes}) per sample."""
    current: Optional[str] = None
    sample: Members = {}
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, ext = split_name(info.name)
            f = tar.extractfile(info)
            data = f.read() if f is not None else b""
            if current is not None and key != current:
                yield current, sample
                sample = {}
            current = key
            sample[ext] = data
    if current is not None:
        yield current, sample


def scan_shard(shard_url: str, options: Optional[Mapping[str, Any]] = None) -> list[tuple[str, Members]]:
    """All samples of a shard by scanning it front to back (no index)."""
    return list(iter_tar(io.BytesIO(storage.read_bytes(shard_url, options=options))))


def load_index(index_url: str, options: Optional[Mapping[str, Any]] = None) -> ShardIndex:
    """Read and parse a shard's index."""
    return ShardIndex.from_json(storage.read_bytes(index_url, options=options), index_url)


def encode_label(label: int) -> bytes:
    """A `.cls` member: the class index as ASCII digits."""
    return str(int(label)).encode("ascii")


def decode_label(data: bytes) -> int:
    """Parse a `.cls` member."""
    return int(data.decode("ascii").strip())

