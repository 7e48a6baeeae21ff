"""Adding third-party WebDataset tars to a dataset in place (`selfsup shards add`), without re-encoding.

Each tar is read once: checked (plain tar, every sample's members contiguous, a member the
modality reads in every sample, the first sample decodes), indexed and hashed. Its index goes
beside it (`<tar stem>.idx`, created only if absent, reused when it already indexes the same
samples) or, when the source is read-only, holds a foreign `.idx`, or `index_in_dest` is set,
under `<dataset>/_external/`. Then a manifest row marked `external` names the tar by its absolute
URL (pipeline/manifest.py). A tar already visible in the dataset is skipped, so adding the same
tars again adds nothing; members the modality does not read (`.json`, `.cls`, `.txt`) stay as
they are and are ignored by training.
"""
from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from selfsup.pipeline import manifest, storage
from selfsup.pipeline.media import extensions_of
from selfsup.pipeline.modalities import DecodeError, make_modality
from selfsup.pipeline.modalities.base import check_decodes
from selfsup.pipeline.tarindex import ShardIndex, index_tar, members_from_range

EXTERNAL_DIR = "_external"  # indexes of added tars whose own folder cannot take one
COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tar.zstd")
MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
ROWS_PER_PART = 256  # manifest rows appended together (one part each)


@dataclass(frozen=True)
class AddedShard:
    """One tar checked and indexed, ready for its manifest row."""

    url: str
    index: str        # a path inside the dataset, or the absolute URL beside the tar
    n_samples: int
    n_bytes: int
    sha256: str


@dataclass
class AddReport:
    """What `add_tars` did: shards added, already present, changed (or gone) since added, and refused (url, why)."""

    added: list[AddedShard] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    changed: list[tuple[str, str]] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(s.n_samples for s in self.added)


def find_tars(pattern: str, options: Optional[Mapping[str, Any]] = None) -> list[str]:
    """The tar URLs a `shards add` argument names: one file, a glob, or every tar under a folder."""
    if not any(c in pattern for c in "*?["):
        name = pattern.rstrip("/").lower()
        if name.endswith(".tar") or name.endswith(COMPRESSED):
            if not storage.exists(pattern, options):
                raise FileNotFoundError(f"{storage.redact_url(pattern)} does not exist")
            return [storage.full_url(pattern)]
        pattern = storage.join(pattern, "**")
    urls = [u for u in storage.glob(storage.full_url(pattern), options)
            if u.lower().endswith(".tar") or u.lower().endswith(COMPRESSED)]
    if not urls:
        raise FileNotFoundError(f"no .tar files match {storage.redact_url(pattern)}")
    return urls


def compression_problem(url: str, head: bytes) -> Optional[str]:
    """Why a tar cannot be added as it is compressed (by name or by its first bytes), or None."""
    if url.lower().endswith(COMPRESSED):
        return ("is a compressed tar: selfsup reads samples by byte ranges, which a compressed stream "
                "does not allow; decompress it (e.g. `gunzip`) to a .tar and add that")
    for magic, kind in MAGIC.items():
        if head.startswith(magic):
            return f"is {kind}-compressed despite its .tar name: decompress it to a plain tar and add that"
    return None


def check_samples(url: str, index: ShardIndex, data: bytes, modality: str) -> None:
    """ValueError naming the shard unless every sample has a member the modality reads and the first decodes."""
    if not len(index):
        raise ValueError(f"{storage.redact_url(url)} holds no samples")
    wanted = set(extensions_of(modality))
    for key, members in zip(index.keys, index.members):
        if not wanted & set(members):
            raise ValueError(f"{storage.redact_url(url)}: sample {key!r} has members {sorted(members)} but no "
                             f"{modality} member (one of {sorted(wanted)}): mixed samples; add shards whose "
                             "every sample holds its media")
    (first, sample), = members_from_range(index, 0, 1, data[index.starts[0]: index.ends[0]])
    try:
        check_decodes(make_modality(modality), sample)
    except DecodeError as e:
        raise ValueError(f"{storage.redact_url(url)}: its first sample {first!r} does not decode as {modality} "
                         f"({e}); check --modality") from None


def index_shard(url: str, modality: str, options: Optional[Mapping[str, Any]] = None) -> tuple[ShardIndex, bytes]:
    """Read one tar, check it (`compression_problem`, contiguous keys, `check_samples`) and index it."""
    problem = compression_problem(url, b"")
    data = b"" if problem else storage.read_bytes(url, options=options)
    problem = problem or compression_problem(url, data[:8])
    if problem:
        raise ValueError(f"{storage.redact_url(url)} {problem}")
    try:
        index = index_tar(io.BytesIO(data), posixpath.basename(url))
    except (tarfile.TarError, EOFError) as e:
        raise ValueError(f"{storage.redact_url(url)} is not a readable tar ({e})") from None
    except ValueError as e:  # index_tar: a sample's members are not contiguous (keys interleaved)
        raise ValueError(f"{storage.redact_url(url)}: mixed keys: {e}; webdataset readers need each sample's "
                         "members one after another (rewrite the tar sorted by key)") from None
    check_samples(url, index, data, modality)
    return index, data


def beside(url: str) -> str:
    """Where the index of the tar `url` goes when it can sit next to it."""
    return url[: -len(".tar")] + ".idx" if url.lower().endswith(".tar") else url + ".idx"


def in_dest(url: str) -> str:
    """The index path inside the dataset for the tar `url` (unique per URL)."""
    stem = posixpath.basename(url).rsplit(".", 1)[0]
    digest = hashlib.blake2b(url.encode(), digest_size=4).hexdigest()
    return f"{EXTERNAL_DIR}/{stem}-{digest}.idx"


def place_index(url: str, index: ShardIndex, dest: str, index_in_dest: bool,
                options: Optional[Mapping[str, Any]] = None) -> str:
    """Store the index (beside the tar if allowed and possible, else under `dest`); returns the row's `index`."""
    text = index.to_json()
    if not index_in_dest:
        target = beside(url)
        try:
            if storage.write_if_absent(target, text.encode(), options) or _same_index(target, index, options):
                return target
        except (PermissionError, OSError, ValueError):  # read-only source, or no conditional creates
            pass
    rel = in_dest(url)
    storage.write_text(storage.join(dest, rel), text, options)
    return rel


def _same_index(url: str, index: ShardIndex, options: Optional[Mapping[str, Any]]) -> bool:
    """Whether the file at `url` is a selfsup index of the same samples and byte layout (a rerun's)."""
    try:
        found = ShardIndex.from_json(storage.read_bytes(url, options=options), url)
    except (ValueError, FileNotFoundError):
        return False  # someone else's .idx: left alone
    return found == index


def add_one(url: str, dest: str, modality: str, index_in_dest: bool,
            options: Optional[Mapping[str, Any]] = None) -> AddedShard:
    """Check, index and hash one tar, and store its index; its manifest row is the caller's."""
    index, data = index_shard(url, modality, options)
    where = place_index(url, index, dest, index_in_dest, options)
    return AddedShard(url, where, len(index), len(data), hashlib.sha256(data).hexdigest())


def add_tars(urls: Sequence[str], dest: str, modality: str, split: str, index_in_dest: bool = False,
             workers: int = 4, options: Optional[Mapping[str, Any]] = None,
             progress: Optional[Callable[[int], None]] = None) -> AddReport:
    """Add the tars `urls` to the dataset `dest` in place: index each, then append their manifest rows."""
    rows = manifest.read_manifest(dest, options) if manifest.part_urls(dest, options) else []
    visible = {manifest.locate(dest, r): r for r in rows}  # by location: DEST's own tars count as present
    report = AddReport()
    todo = []
    for url in dict.fromkeys(urls):
        row = visible.get(url)
        if row is None:
            todo.append(url)
            continue
        try:
            size = storage.size(url, options)
        except FileNotFoundError:
            size = None
        if size == row["n_bytes"]:
            report.present.append(url)
        else:
            report.changed.append((url, "it is gone" if size is None else "its size differs from when it was added"))

    def one(url: str) -> AddedShard | tuple[str, str]:
        try:
            return add_one(url, dest, modality, index_in_dest, options)
        except (ValueError, FileNotFoundError) as e:
            return url, str(e)
        finally:
            if progress is not None:
                progress(1)

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo) or 1))) as pool:
        for result in pool.map(one, todo):
            if isinstance(result, AddedShard):
                report.added.append(result)
            else:
                report.refused.append(result)
    new = [_row(s, modality, split) for s in report.added]
    for lo in range(0, len(new), ROWS_PER_PART):
        manifest.append_rows(dest, new[lo: lo + ROWS_PER_PART], options)
    return report


def _row(shard: AddedShard, modality: str, split: str) -> dict[str, Any]:
    return {"path": shard.url, "index": shard.index, "modality": modality, "split": split,
            "n_samples": shard.n_samples, "n_bytes": shard.n_bytes, "sha256": shard.sha256, "external": True,
            "meta": json.dumps({"source": "shards add", "label_names": []})}
