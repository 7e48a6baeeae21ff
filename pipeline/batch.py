"""Making micro-batch i of an epoch: ranged reads → decode → views → masks → fixed-shape arrays.

`BatchMaker.make(epoch, i)` is a pure function of (feed spec, epoch, i): ShardStream actors,
local worker processes and the calling thread all produce the same bytes, so any of them can
make any batch. Bad samples (decode failures on fully read bytes, and samples whose index gives
them more bytes than their modality reads, left unread) are quarantined: their slot is filled by
a stable-hash choice from the same micro-batch, flagged and reported; no other position moves.
Samples known to kill the process making them (`killers`, found by the feed's isolation of a
batch that kept killing its worker) are quarantined the same way, never decoded.
I/O errors are retried by the storage layer, then raised naming the shard.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from typing import AbstractSet, Any, Mapping, Optional, Sequence

import numpy as np

from selfsup.pipeline import storage
from selfsup.pipeline.buffers import MEMBER_VIEW_BYTES
from selfsup.pipeline.indexcache import DEFAULT_INDEX_CACHE_BYTES, IndexCache
from selfsup.pipeline.masking import make_mask
from selfsup.pipeline.modalities import make_modality
from selfsup.pipeline.modalities.base import Modality, Sample
from selfsup.pipeline.plan import EpochPlan, plan_epoch
from selfsup.pipeline.reads import ReadCounter, ordered_reads
from selfsup.pipeline.seeding import sample_rng, stable_hash
from selfsup.pipeline.snapshot import Snapshot, sample_ids
from selfsup.pipeline.tarindex import PackedIndex, decode_label, load_index, members_from_range

ON_ERROR = ("quarantine", "raise")
MAX_REPLACEMENT_ATTEMPTS = 16
KILLED = "WorkerKilled: making this sample killed the process making it"  # a killer's quarantine error
MAX_SAMPLE_BYTES = 2**31  # the most one sample may span in its shard (the video modality reads members up to 2 GB)
SAMPLE_OVERHEAD = 2**20   # tar headers, .json and .cls beside a media member


class ShardReadError(IOError):
    """A shard that could not be read after retries; stops the run."""


class SampleDecodeError(ValueError):
    """A sample that failed to decode while on_error='raise'."""


class SampleTooLarge(ValueError):
    """A sample whose index gives it more bytes than its modality reads; it is quarantined unread."""


@dataclass(frozen=True)
class FeedSpec:
    """Everything that determines the batches: data, plan parameters, modality and masks."""

    snapshot: Snapshot
    batch_size: int
    modality_args: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    train: bool = True
    mix: int = 4
    run_length: Optional[int] = None
    mask: Optional[Mapping[str, Any]] = None  # {"kind", "ratio", "geometry", ...}
    label: Optional[str] = None               # eval: "cls" or a key of the sample's .json
    on_error: str = "quarantine"
    storage_options: Optional[Mapping[str, Any]] = None
    index_cache_bytes: int = DEFAULT_INDEX_CACHE_BYTES  # shard indexes a maker keeps (not in the hash: same batches)
    read_concurrency: Optional[int] = None  # segment reads in flight per micro-batch; None: default_read_concurrency

    def __post_init__(self) -> None:
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")
        if self.index_cache_bytes < 0:
            raise ValueError(f"index_cache_bytes={self.index_cache_bytes} is negative; give 0 (no cache) or more "
                             "(data.index_cache_mb)")
        if self.read_concurrency is not None and self.read_concurrency < 1:
            raise ValueError(f"read_concurrency={self.read_concurrency} must be at least 1 (1 reads one segment "
                             "at a time; leave it unset for one read per shard mixed in a batch: data.read_concurrency)")

    def __hash__(self) -> int:  # mappings inside: hash a stable digest instead
        return stable_hash(self.snapshot.digest(), self.batch_size, json.dumps(
            [dict(self.modality_args), self.seed, self.train, self.mix, self.run_length,
             dict(self.mask or {}), self.label, self.on_error], sort_keys=True, default=str))

    def plan(self, epoch: int) -> EpochPlan:
        """The plan of an epoch under this spec."""
        return plan_epoch(self.snapshot, self.seed, epoch, self.batch_size, self.mix, self.run_length, self.train)


def default_read_concurrency(spec: FeedSpec) -> int:
    """Segment reads a maker keeps in flight when not told: one per shard mixed in a micro-batch on
    object storage, where each read waits on the network; 1 when every shard is a local file, whose
    reads come from the page cache or the disk's own queue: a pool of threads there only adds its
    overhead (thread starts and hand-offs on every micro-batch). Give data.read_concurrency for a
    network file system mounted as a local path."""
    return 1 if all(storage.is_local(s.url) for s in spec.snapshot.shards) else spec.mix


def sample_byte_limit(modality: Modality) -> int:
    """The most bytes a sample may span before it is read: its modality's `max_bytes` (if any) plus headers."""
    member = getattr(modality, "max_bytes", None)
    return MAX_SAMPLE_BYTES if member is None else min(MAX_SAMPLE_BYTES, int(member) + SAMPLE_OVERHEAD)


def label_of(members: Mapping[str, bytes], target: str) -> int:
    """The integer label `target` of a sample: `.cls`, or a key of its `.json`; -1 if absent."""
    try:
        if target == "cls":
            return decode_label(bytes(members["cls"])) if "cls" in members else -1
        meta = json.loads(bytes(members["json"])) if "json" in members else {}
        return int(meta[target]) if target in meta else -1
    except (ValueError, KeyError, TypeError):
        return -1


def check_targets(snapshot: Snapshot, options: Optional[Mapping[str, Any]] = None) -> None:
    """Raise ValueError when a labeled source's first sample lacks its label target (a misnamed key
    would otherwise leave every row of the source unlabeled, -1, without a word). One sample read per source."""
    for source, target in snapshot.targets:
        ref = next((s for s in snapshot.shards if s.source == source), None)
        if ref is None or ref.n_samples == 0:
            continue
        idx = load_index(ref.index_url, options)
        start, end = idx.span(0, 1)
        key, members = members_from_range(idx, 0, 1, storage.read_bytes(ref.url, start, end, options))[0]
        if label_of(members, target) < 0:
            keys = sorted(json.loads(members["json"])) if "json" in members else []
            raise ValueError(f"data.sources {source}: target {target!r} is not in its sample {key} of "
                             f"{storage.redact_url(ref.url)} (members {sorted(members)}, .json keys {keys}); "
                             "give 'cls' or a key its samples carry, or drop target for an unlabeled source")


class BatchMaker:
    """Makes micro-batches for one feed spec; caches shard indexes (bounded in bytes) and epoch plans."""

    def __init__(self, spec: FeedSpec) -> None:
        _one_thread()
        self.spec = spec
        self.modality = make_modality(spec.snapshot.modality, **dict(spec.modality_args))
        self.grid = self.modality.token_grid(spec.mask["geometry"]) if spec.mask is not None else None
        self.sample_limit = sample_byte_limit(self.modality)
        self._index: IndexCache[PackedIndex] = IndexCache(self._load_index, spec.index_cache_bytes)
        self._index_lock = threading.Lock()  # segment reads look indexes up from the read pool's threads
        self.reads = ReadCounter()
        self.read_concurrency = spec.read_concurrency or default_read_concurrency(spec)
        self.member_views = bool(getattr(self.modality, "member_views", False))  # large members as views, no copy

    def _index_of(self, shard: int) -> PackedIndex:
        with self._index_lock:
            return self._index(shard)

    def _load_index(self, shard: int) -> PackedIndex:
        ref = self.spec.snapshot.shards[shard]
        try:
            idx = load_index(ref.index_url, self.spec.storage_options)
        except (OSError, ValueError) as e:
            raise ShardReadError(f"cannot read the index of {storage.redact_url(ref.url)}: {e}") from e
        if len(idx) != ref.n_samples:
            raise ShardReadError(f"{storage.redact_url(ref.url)}: index lists {len(idx)} samples, "
                                 f"the snapshot {ref.n_samples}")
        return PackedIndex(idx)

    def index_stats(self) -> dict[str, int]:
        """The shard-index cache: entries, bytes held, budget, hits, misses, evictions."""
        return self._index.stats()

    def read(self, shard: int, lo: int, hi: int) -> list[tuple[str, dict[str, bytes]]]:
        """Samples lo..hi-1 of a snapshot shard, one ranged read.

        If the modality takes views (`member_views`) and a sample spans MEMBER_VIEW_BYTES or more,
        the range is read as a view (a local one memory-mapped) and its large members are views of it.
        """
        ref, idx = self.spec.snapshot.shards[shard], self._index_of(shard)
        start, end = idx.span(lo, hi)
        views = self.member_views and hi > lo and int((idx.ends[lo:hi] - idx.starts[lo:hi]).max()) >= MEMBER_VIEW_BYTES
        token = self.reads.begin()
        data: bytes | memoryview = b""
        try:
            data = (storage.read_view if views else storage.read_bytes)(ref.url, start, end, self.spec.storage_options)
        except OSError as e:
            raise ShardReadError(f"reading {storage.redact_url(ref.url)} bytes {start}-{end} failed: {e}") from e
        finally:
            self.reads.end(token, len(data))
        return members_from_range(idx, lo, hi, data, views_from=MEMBER_VIEW_BYTES if views else None)

    def read_within_limit(self, shard: int, lo: int, hi: int) -> list[tuple[str, dict[str, bytes], Optional[str]]]:
        """Samples lo..hi-1 as (key, members, why unread), reading only those within `sample_limit`.

        Each run of such samples is one ranged read; any other is left unread (members {}) on its index size alone.
        """
        idx = self._index_of(shard)
        fits = (idx.ends[lo:hi] - idx.starts[lo:hi] <= self.sample_limit).tolist()
        out: list[tuple[str, dict[str, bytes], Optional[str]]] = []
        j = lo
        while j < hi:
            if not fits[j - lo]:
                out.append((idx.keys[j], {}, f"sample is {idx.ends[j] - idx.starts[j]} bytes in its shard index, over "
                                             f"the limit of {self.sample_limit} for {self.modality.name}: not read"))
                j += 1
                continue
            k = j + 1
            while k < hi and fits[k - lo]:
                k += 1
            out += [(key, members, None) for key, members in self.read(shard, j, k)]
            j = k
        return out

    def sample(self, epoch: int, shard: int, key: str, members: Mapping[str, bytes], slot: int) -> Sample:
        """One sample's arrays (views, mask); raises on decode failure."""
        url = self.spec.snapshot.shards[shard].url
        with self.reads.decode():  # the kernel's work: counted apart from reads and batch assembly
            rng = sample_rng(self.spec.seed, epoch, url, key)
            out = self.modality.sample(self.modality.decode(members), rng, self.spec.train)
            if self.spec.mask is not None and self.grid is not None:  # both or neither
                mrng = sample_rng(self.spec.seed, epoch, url, key, "mask")
                valid = self.modality.valid_tokens(out, self.spec.mask["geometry"])
                out["mask"] = make_mask(self.spec.mask, self.grid, mrng, valid=valid)
        return out

    def keys(self, epoch: int, i: int) -> list[tuple[str, str]]:
        """(shard URL, sample key) of each row of micro-batch i, from the indexes alone (nothing decoded)."""
        out = []
        for shard, lo, hi in self.spec.plan(epoch).batch(i):
            idx = self._index_of(shard)
            out += [(self.spec.snapshot.shards[shard].url, idx.keys[p]) for p in range(lo, hi)]
        return out

    def check(self, epoch: int, i: int, slot: int) -> bool:
        """Make only row `slot` of micro-batch i (the feed's isolation: does this sample kill its
        process?); True if it decoded, False if it failed the ordinary way (a decode error)."""
        shard, lo, _ = _locate(self.spec.plan(epoch).batch(i), slot)
        key, members, why = self.read_within_limit(shard, lo, lo + 1)[0]
        if why:  # too large to read: make() quarantines it unread
            return False
        try:
            self.sample(epoch, shard, key, members, slot)
        except Exception:  # noqa: BLE001 - a decode failure; make() quarantines it
            return False
        return True

    def make(self, epoch: int, i: int, killers: AbstractSet[tuple[str, str]] = frozenset()) -> dict[str, Any]:
        """Micro-batch i of `epoch` as a dict of contiguous numpy arrays (plus a quarantine list).

        The segments' ranged reads run `read_concurrency` at a time; each segment's samples are
        decoded, in order, as soon as its bytes are there. `killers`: (shard URL, key) of samples
        that kill the process decoding them; quarantined undecoded.
        """
        plan = self.spec.plan(epoch)
        segments = plan.batch(i)
        rows: list[tuple[int, int, str, dict[str, bytes]]] = []  # shard, position, key, members
        out = BatchRows(self.spec.batch_size)  # each sample's arrays go into their row as soon as made
        errors: dict[int, str] = {}  # slot: why its sample is quarantined
        with ordered_reads(self.read_within_limit, segments, self.read_concurrency) as reads:
            for (shard, lo, hi), read in zip(segments, reads):
                for pos, (key, members, why) in zip(range(lo, hi), read):
                    sample, error = self._try_sample(epoch, (shard, key, members, why), len(rows), killers)
                    if sample is None:
                        errors[len(rows)] = error or "no sample"
                    else:
                        out.put(len(rows), sample, key)
                    rows.append((shard, pos, key, members))
                    del sample  # its arrays are in the batch now: the allocator reuses them for the next
        n_valid = int(plan.valid[i])
        quarantine = []
        for slot in sorted(errors):
            shard, pos, key, _ = rows[slot]
            self._replace(out, epoch, key, len(rows), slot)
            quarantine.append({"shard": self.spec.snapshot.shards[shard].url, "key": key, "epoch": epoch,
                               "position": pos, "error": errors[slot][:500]})
        return self._finish(epoch, i, rows, out, sorted(errors), n_valid, quarantine)

    def _try_sample(self, epoch: int, read: tuple[int, str, dict[str, bytes], Optional[str]], slot: int,
                    killers: AbstractSet[tuple[str, str]]) -> tuple[Optional[Sample], Optional[str]]:
        """(sample, None), or (None, why it is quarantined) for a read (shard, key, members, why unread):
        a killer, unread, or a decode failure (raised instead under on_error='raise')."""
        shard, key, members, why = read
        url = self.spec.snapshot.shards[shard].url
        if (url, key) in killers:
            return None, KILLED
        try:
            if why:
                raise SampleTooLarge(why)
            return self.sample(epoch, shard, key, members, slot), None
        except Exception as e:  # noqa: BLE001 - any failure on fully read bytes is a decode failure
            if self.spec.on_error == "raise":
                raise SampleDecodeError(f"{storage.redact_url(url)} sample {key}: {type(e).__name__}: {e}") from e
            return None, f"{type(e).__name__}: {e}"

    def _replace(self, out: "BatchRows", epoch: int, key: str, n_rows: int, slot: int) -> None:
        """Fill bad row `slot` (sample `key`) from a stable-hash row of the same micro-batch that holds a
        sample (one made, or a replacement already filled in); the first such row after 16 misses; else blank."""
        for attempt in range(MAX_REPLACEMENT_ATTEMPTS):
            j = stable_hash(self.spec.seed, epoch, key, attempt) % n_rows
            if out.filled[j]:
                out.copy_row(j, slot)
                return
        good = np.flatnonzero(out.filled[:n_rows])
        if len(good):
            out.copy_row(int(good[0]), slot)
        else:
            out.put(slot, self._blank(), key)

    def _blank(self) -> Sample:
        """A padding row: the modality's zero arrays (and an all-false mask)."""
        blank = self.modality.blank(self.spec.train)
        if self.grid is not None:
            blank["mask"] = np.zeros(int(np.prod(self.grid)), bool)
        return blank

    def _finish(self, epoch: int, i: int, rows: list, out: "BatchRows", bad: list[int], n_valid: int,
                quarantine: list) -> dict[str, Any]:
        """The batch dict: the rows' arrays (padding rows blank), then the per-row bookkeeping fields."""
        size = self.spec.batch_size
        pad = size - len(rows)
        if pad:
            blank = self._blank()
            for j in range(len(rows), size):
                out.put(j, blank, "(padding)")
        batch: dict[str, Any] = dict(out.fields or {})  # every row is put by now: made, replaced or padding
        snapshot = self.spec.snapshot
        batch["key"] = np.array([r[2] for r in rows] + [""] * pad)
        batch["shard"] = np.array([snapshot.shards[r[0]].url for r in rows] + [""] * pad)
        batch["position"] = np.array([r[1] for r in rows] + [-1] * pad, dtype=np.int64)
        batch.update(row_fields(snapshot, rows, pad, bad))
        batch["quarantined"] = np.zeros(size, bool)
        batch["quarantined"][bad] = True
        batch["valid"] = np.arange(size) < n_valid
        if self.spec.label:
            batch["label"] = np.array([label_of(r[3], self.spec.label) for r in rows] + [-1] * pad, np.int64)
        batch["epoch"] = np.int64(epoch)
        batch["index"] = np.int64(i)
        batch["quarantine"] = quarantine
        return batch


class BatchRows:
    """A micro-batch's fixed-shape fields, each one preallocated contiguous [B, ...] array, written row
    by row as samples are made (no list of samples held, no stacking copy at the end).

    The bytes np.stack of the rows gives: a field is allocated at its first row's shape and dtype, and
    a later row of a wider dtype widens it (np.stack's promotion); a row of another shape or with
    other fields raises ValueError naming the row, as np.stack would raise for the batch.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.fields: Optional[dict[str, np.ndarray]] = None
        self.filled = np.zeros(size, bool)  # rows holding a sample (made or copied), not padding

    def put(self, j: int, sample: Mapping[str, Any], key: str) -> None:
        """Write `sample`'s arrays into row j (`key` names it in errors)."""
        if self.fields is None:
            self.fields = {k: np.empty((self.size, *np.shape(v)), np.asarray(v).dtype) for k, v in sample.items()}
        if sample.keys() != self.fields.keys():
            raise ValueError(f"sample {key} has fields {sorted(sample)}, the batch's other rows "
                             f"{sorted(self.fields)}: a modality's samples (and its blank) must all have the same fields")
        for k, v in sample.items():
            dst = self.fields[k]
            v = np.asarray(v)
            if v.shape != dst.shape[1:]:
                raise ValueError(f"all input arrays must have the same shape: field {k!r} of sample {key} is "
                                 f"{v.shape}, the batch's other rows {dst.shape[1:]}")
            if v.dtype != dst.dtype:
                wider = np.result_type(dst.dtype, v.dtype)
                if wider != dst.dtype:
                    dst = self.fields[k] = dst.astype(wider)
            dst[j] = v
        self.filled[j] = True

    def copy_row(self, src: int, dst: int) -> None:
        """Row `src`'s arrays into row `dst` (a quarantined row's replacement)."""
        for v in (self.fields or {}).values():
            v[dst] = v[src]
        self.filled[dst] = True


def stack_rows(samples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Each field of `samples` as one contiguous [B, ...] array (BatchRows): np.stack's bytes and promotion."""
    out = BatchRows(len(samples))
    for j, sample in enumerate(samples):
        out.put(j, sample, f"row {j}")
    return out.fields or {}


def row_fields(snapshot: Snapshot, rows: list, pad: int, bad: list[int]) -> dict[str, np.ndarray]:
    """`sample_id` [B] int64 (snapshot ordinal, see `sample_ids`) and, when the snapshot has labeled
    sources, `label` [B] int64 (their target, -1 for rows of unlabeled sources or lacking it); both -1
    for padding and for quarantined rows, whose slot holds another row's sample.

    rows: (shard index, position, key, members) of each real row.
    """
    out = {"sample_id": sample_ids(snapshot, [r[0] for r in rows], [r[1] for r in rows], pad)}
    if snapshot.targets:
        targets = [snapshot.target_of(r[0]) for r in rows]
        out["label"] = np.array([label_of(r[3], t) if t else -1 for r, t in zip(rows, targets)] + [-1] * pad,
                                np.int64)
    for name in out:
        out[name][bad] = -1
    return out


def _locate(segments: list[tuple[int, int, int]], slot: int) -> tuple[int, int, int]:
    """The (shard, position, position + 1) of row `slot` of a micro-batch made of `segments`."""
    for shard, lo, hi in segments:
        if slot < hi - lo:
            return shard, lo + slot, lo + slot + 1
        slot -= hi - lo
    raise IndexError(f"row {slot} is past the end of the micro-batch")


def _one_thread() -> None:
    """One OpenCV/torch thread per batch maker: parallelism comes from streams, not threads (the
    read pool's threads only wait on ranged reads; decoding stays on the thread calling make)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def keep_freed_memory(mmap_threshold: int = 32 * 2**20, trim_threshold: int = 512 * 2**20) -> bool:
    """Make this data-worker process reuse freed memory instead of giving it back to the OS each batch.

    glibc's default hands a freed large block (a decoded image, a stacked batch) back to the OS
    and faults fresh zeroed pages in for the next one: a ShardStream took ~150 page faults per
    224 px two-view image sample, about 10% of its CPU. With these thresholds (mmap at glibc's
    32 MiB maximum) the peak working set of a few batches stays mapped and is reused. Call it in
    stream and worker processes only, not in a trainer. Returns False where libc has no mallopt.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc/musl (macOS, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))

