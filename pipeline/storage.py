"""Storage: every location is a local path or an fsspec URL (file://, s3://, gs://, memory://).

All I/O goes through the functions here, which retry transient errors in one bounded layer
(pipeline/retries.py), write atomically (a reader sees the whole object or nothing), and never
put credentials in messages.

S3 settings come from the usual AWS environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_PROFILE, AWS_REGION, AWS_ENDPOINT_URL) or from storage options given in config:
`{"endpoint_url": ..., "region": ..., "key": ..., "secret": ..., "profile": ...}`.
GCS settings come from Google's application default credentials or from gcsfs options:
`{"project": ..., "token": ..., "endpoint_url": ...}` (STORAGE_EMULATOR_HOST names an emulator).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Optional, TypeVar

import fsspec

from selfsup.pipeline import retries
from selfsup.pipeline.redaction import (SECRET_WORDS, is_secret_name, redact,  # noqa: F401 - re-exported
                                        redact_text, redact_url)
from selfsup.pipeline.retries import is_transient

log = logging.getLogger(__name__)
T = TypeVar("T")

_PROTOCOL_ALIASES = {"s3a": "s3", "gcs": "gs", "": "file", "local": "file"}
_CLIENT_RETRIED = {"gs"}  # protocols whose client library retries every request itself (pipeline/retries.py)
WRITE_TOKEN = "selfsup-write"  # object metadata naming the call that wrote a conditional write


# ---------------------------------------------------------------- URLs and filesystems

def protocol_of(url: str) -> str:
    """The normalized protocol of a URL ('file' for plain paths)."""
    proto = url.split("://", 1)[0].lower() if "://" in url else ""
    return _PROTOCOL_ALIASES.get(proto, proto)


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL or path with '/'."""
    out = url.rstrip("/")
    for part in parts:
        out = out + "/" + part.strip("/")
    return out


def is_local(url: str) -> bool:
    """True for plain paths and file:// URLs."""
    return protocol_of(url) == "file"


def local_path(url: str) -> str:
    """The filesystem path of a plain path or file:// URL."""
    return os.path.abspath(os.path.expanduser(url[7:] if url.startswith("file://") else url))


def filesystem(url: str, options: Optional[Mapping[str, Any]] = None, client_attempts: int = 1) -> tuple[Any, str]:
    """The fsspec filesystem and the protocol-free path for `url`.

    `client_attempts` is how many requests botocore may make per S3 call: 1 for calls that go
    through `retrying` (the one retry layer), more for callers without a layer of their own.
    Raises ValueError for protocols selfsup cannot reach, naming how to enable them.
    """
    protocol = protocol_of(url)
    if protocol == "file":
        return fsspec.filesystem("file"), local_path(url)
    try:
        from selfsup.pipeline import clients  # imports s3fs: only once an object store is used

        if protocol == "gs":
            fs = clients.gcs_filesystem(options)
        elif protocol == "s3":
            fs = clients.s3_filesystem(options, client_attempts)
        else:
            fs = fsspec.filesystem(protocol, **dict(options or {}))
    except ImportError as e:
        if protocol == "gs":
            raise ValueError(f"{redact_url(url)}: gs:// needs gcsfs; `pip install 'selfsup[gcs]'`") from None
        raise ValueError(f"cannot open storage {redact_url(url)}: {e}") from None
    except ValueError as e:
        raise ValueError(f"cannot open storage {redact_url(url)}: {e}") from None
    return fs, fs._strip_protocol(url)


def full_url(url: str) -> str:
    """A URL with its protocol (plain paths become absolute local paths)."""
    return local_path(url) if is_local(url) else url


# ---------------------------------------------------------------- retries

def retrying(fn: Callable[[], T], url: str, base_delay: Optional[float] = None) -> T:
    """Call `fn` (a storage call on `url`) in the one retry layer that `url`'s protocol gets.

    s3://, local paths and memory:// retry here (pipeline/retries.py: at most `retries.ATTEMPTS`
    attempts, sleeps of at most `retries.wait_bound(retries.ATTEMPTS)` s in all); gs:// makes one
    attempt, since gcsfs retries every request itself. Raises StorageUnavailable naming the URL
    (redacted) when transient errors outlast the retries.
    """
    if protocol_of(url) in _CLIENT_RETRIED:
        return retries.retry(fn, redact_url(url), 1, by=" (each retried by the client library)")
    return retries.retry(fn, redact_url(url), base_delay=base_delay)


# ---------------------------------------------------------------- reads

def read_bytes(url: str, start: Optional[int] = None, end: Optional[int] = None,
               options: Optional[Mapping[str, Any]] = None) -> bytes:
    """The bytes of `url`, or of the range [start, end) with one ranged read."""
    fs, path = filesystem(url, options)

    def read() -> bytes:
        if start is None and end is None:
            return fs.cat_file(path)
        size = os.path.getsize(path) if end is not None and is_local(url) else None
        if size is not None and end is not None and end > size:  # a local read allocates the whole range first
            raise OSError(errno.EINVAL, f"range [{start}, {end}) runs past the end of the file ({size} bytes)")
        data = fs.cat_file(path, start=start, end=end)
        if start is not None and end is not None and len(data) != end - start:
            raise OSError(errno.EIO, f"short read: wanted {end - start} bytes, got {len(data)}")
        return data

    try:
        return retrying(read, url)
    except FileNotFoundError:
        lines = _line_log(url, options, "read") if start is None and end is None else None
        if lines is None:
            raise
        return lines


def read_view(url: str, start: int, end: int, options: Optional[Mapping[str, Any]] = None) -> memoryview:
    """The bytes [start, end) of `url` as a read-only memoryview, without copying a local file's.

    A local range is memory-mapped: its pages come from the page cache as they are touched, so a
    reader of part of it reads only that part. The shard must not shrink while a view of it lives
    (shards are written once, by rename: a replaced file's old pages stay mapped; truncating one in
    place would make touching a page past its new end kill the process with SIGBUS). Other stores
    read the range with `read_bytes` and view it.
    """
    if not is_local(url) or end <= start:
        return memoryview(read_bytes(url, start, end, options))
    path = local_path(url)

    def mapped() -> memoryview:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if end > size:
                raise OSError(errno.EINVAL, f"range [{start}, {end}) runs past the end of the file ({size} bytes)")
            base = start - start % mmap.ALLOCATIONGRANULARITY
            mapping = mmap.mmap(f.fileno(), end - base, access=mmap.ACCESS_READ, offset=base)
        return memoryview(mapping)[start - base:]  # the view keeps the mapping; unmapped when the last view goes

    return retrying(mapped, url)


def _line_log(url: str, options: Optional[Mapping[str, Any]], op: str) -> Any:
    """Call linelog.`op` for object stores that keep appended files as line logs (None elsewhere)."""
    if protocol_of(url) not in ("s3", "gs"):
        return None
    from selfsup.pipeline import linelog

    return getattr(linelog, op)(url, options)


def read_text(url: str, options: Optional[Mapping[str, Any]] = None) -> str:
    """The UTF-8 text of `url`."""
    return read_bytes(url, options=options).decode("utf-8")


def exists(url: str, options: Optional[Mapping[str, Any]] = None) -> bool:
    """Whether an object or folder exists at `url`."""
    fs, path = filesystem(url, options)
    return bool(retrying(lambda: fs.exists(path), url) or _line_log(url, options, "exists"))


def size(url: str, options: Optional[Mapping[str, Any]] = None) -> int:
    """The size in bytes of the object at `url`."""
    fs, path = filesystem(url, options)
    try:
        return int(retrying(lambda: fs.size(path), url))
    except FileNotFoundError:
        lines = _line_log(url, options, "read")
        if lines is None:
            raise
        return len(lines)


def listdir(url: str, options: Optional[Mapping[str, Any]] = None) -> list[str]:
    """Full URLs of the entries directly under `url` (empty if it does not exist; line files as one)."""
    fs, path = filesystem(url, options)

    def ls() -> list[str]:
        try:
            fs.invalidate_cache(path)
            return sorted(fs.ls(path, detail=False))
        except FileNotFoundError:
            return []

    names = retrying(ls, url)
    out = [_rebuild(url, path, n) for n in names if n.rstrip("/") != path.rstrip("/")]
    if protocol_of(url) in ("s3", "gs"):  # a line file's folder of parts lists as the file itself
        from selfsup.pipeline.linelog import SUFFIX

        out = sorted({u.rstrip("/")[: -len(SUFFIX)] if u.rstrip("/").endswith(SUFFIX) else u for u in out})
    return out


def glob(pattern: str, options: Optional[Mapping[str, Any]] = None) -> list[str]:
    """Full URLs of the files matching `pattern` (`*`, `?`, `[…]`, `**` across folders), sorted."""
    fs, path = filesystem(pattern, options)
    found = retrying(lambda: fs.glob(path, detail=True), pattern)
    fs.invalidate_cache()  # the listings glob cached would hide objects written next (s3fs reads check them)
    return sorted(_rebuild(pattern, path, name) for name, info in found.items() if info.get("type") != "directory")


def _rebuild(url: str, path: str, entry: str) -> str:
    """The URL form of an fs path found under `path` (keeps the caller's protocol)."""
    if is_local(url):
        return entry
    proto = url.split("://", 1)[0]
    return f"{proto}://{entry.split('://', 1)[-1].lstrip('/')}"


# ---------------------------------------------------------------- writes

def makedirs(url: str, options: Optional[Mapping[str, Any]] = None) -> None:
    """Create a local folder (object stores need none); raises PermissionError clearly."""
    if is_local(url):
        os.makedirs(local_path(url), exist_ok=True)


def _local_atomic_write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(url: str, data: bytes, options: Optional[Mapping[str, Any]] = None) -> None:
    """Write `data` atomically: local files by rename, object stores by a single PUT."""
    if is_local(url):
        _local_atomic_write(local_path(url), data)
        return
    fs, path = filesystem(url, options)
    retrying(lambda: fs.pipe_file(path, data), url)


def write_text(url: str, text: str, options: Optional[Mapping[str, Any]] = None) -> None:
    """Write UTF-8 text atomically."""
    write_bytes(url, text.encode("utf-8"), options)


def upload_file(local: str, url: str, options: Optional[Mapping[str, Any]] = None) -> None:
    """Copy a local file to `url` atomically (rename locally; one upload to object stores)."""
    if is_local(url):
        dest = local_path(url)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.tmp-{uuid.uuid4().hex}")
        try:
            with open(local, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    fs, path = filesystem(url, options)
    retrying(lambda: fs.put_file(local, path), url)


def delete(url: str, recursive: bool = False, options: Optional[Mapping[str, Any]] = None) -> None:
    """Remove an object (or a folder with recursive=True); missing is fine."""
    fs, path = filesystem(url, options)

    def rm() -> None:
        try:
            fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass

    retrying(rm, url)
    if not recursive:
        _line_log(url, options, "delete")


def check_writable(url: str, options: Optional[Mapping[str, Any]] = None) -> None:
    """Raise PermissionError naming `url` if a small probe object cannot be written there."""
    probe = join(url, f".selfsup-probe-{uuid.uuid4().hex}")
    try:
        makedirs(url, options)
        write_bytes(probe, b"ok", options)
        delete(probe, options=options)
    except (PermissionError, OSError) as e:
        raise PermissionError(f"destination {redact_url(url)} is not writable: {e.strerror or e}") from None


# ---------------------------------------------------------------- conditional writes

def read_versioned(url: str, options: Optional[Mapping[str, Any]] = None) -> tuple[Optional[bytes], Optional[str]]:
    """(bytes, version token) of `url`, or (None, None) if it does not exist.

    The token is what `write_if_version` compares: the ETag on S3, the generation on GCS,
    a content digest for local files.
    """
    protocol = protocol_of(url)
    fs, path = filesystem(url, options)
    if protocol == "file":
        p = local_path(url)
        if not os.path.exists(p):
            return None, None
        data = open(p, "rb").read()
        return data, hashlib.sha256(data).hexdigest()
    if protocol == "s3":
        bucket, key, _ = fs.split_path(path)

        def get() -> tuple[Optional[bytes], Optional[str]]:
            try:
                resp = fs.call_s3("get_object", Bucket=bucket, Key=key)
            except FileNotFoundError:
                return None, None
            body = resp["Body"]
            data = _read_body(fs, body)
            return data, resp["ETag"]

        return retrying(get, url)
    if protocol == "gs":
        def get_gs() -> tuple[Optional[bytes], Optional[str]]:
            try:  # one GET: the bytes and the generation they are, from the same reply
                headers, data = fs.call("GET", fs.url(path))
            except FileNotFoundError:
                return None, None
            return data, headers["X-Goog-Generation"]

        return retrying(get_gs, url)
    raise ValueError(f"conditional writes are not supported on {protocol}:// "
                     "(use a local path, s3:// or gs:// for leases)")


def _read_body(fs: Any, body: Any) -> bytes:
    from fsspec.asyn import sync

    async def read() -> bytes:
        async with body as stream:
            return await stream.read()

    return sync(fs.loop, read)


def write_if_absent(url: str, data: bytes, options: Optional[Mapping[str, Any]] = None) -> bool:
    """Create `url` with `data` only if nothing is there; True if this call created it."""
    protocol = protocol_of(url)
    if protocol == "file":
        p = local_path(url)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        tmp = f"{p}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, p)  # atomic, fails if p exists
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    return _remote_conditional_put(url, data, None, options)


def write_if_version(url: str, data: bytes, version: str,
                     options: Optional[Mapping[str, Any]] = None) -> bool:
    """Replace `url` with `data` only if its version is still `version`; True on success."""
    protocol = protocol_of(url)
    if protocol == "file":
        p = local_path(url)
        with _local_lock(p):
            if not os.path.exists(p) or hashlib.sha256(open(p, "rb").read()).hexdigest() != version:
                return False
            _local_atomic_write(p, data)
            return True
    return _remote_conditional_put(url, data, version, options)


def _remote_conditional_put(url: str, data: bytes, version: Optional[str],
                            options: Optional[Mapping[str, Any]]) -> bool:
    """PUT `data` if absent (version None) or if still at `version`, on s3:// or gs://.

    Each call tags its object with a fresh write token (object metadata). A reply that is lost
    after the store applied the write makes the retry (ours or the client library's) meet
    "precondition failed"; so on a failed precondition or an ambiguous error the object is read
    back, and the call succeeded exactly when the stored token is this call's.
    """
    protocol = protocol_of(url)
    if protocol not in ("s3", "gs"):
        raise ValueError(f"conditional writes are not supported on {protocol}:// "
                         "(use a local path, s3:// or gs:// for leases)")
    fs, path = filesystem(url, options)
    token = uuid.uuid4().hex
    meta = {WRITE_TOKEN: token}
    if protocol == "s3":
        bucket, key, _ = fs.split_path(path)
        cond = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}

        def put() -> None:
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, Metadata=meta, **cond)
    elif version is None:
        def put() -> None:
            fs.pipe_file(path, data, metadata=meta, mode="create")  # gcsfs sends ifGenerationMatch=0
    else:
        def put() -> None:
            _gcs_put_if_generation(fs, path, data, meta, version)
    try:
        retrying(put, url)
        return True
    except BaseException as e:  # noqa: BLE001 - sorted below
        lost = isinstance(e, FileNotFoundError) or _precondition_failed(e)
        if not lost and not is_transient(e):
            raise
        if _write_token(fs, protocol, path, url) == token:
            log.info("conditional write to %s: reply lost, read back: it landed", redact_url(url))
            return True
        if lost:
            return False
        raise


def _gcs_put_if_generation(fs: Any, path: str, data: bytes, meta: dict[str, str], generation: str) -> None:
    """Replace the GCS object at `path` only while it is at `generation` (else FileExistsError, from its 412).

    gcsfs's public writes take no generation precondition (`pipe_file` has only mode="create", i.e.
    ifGenerationMatch=0), so this makes the same multipart upload as gcsfs's `simple_upload` through
    gcsfs's own session and credentials, adding `ifGenerationMatch`.
    """
    bucket, key, _ = fs.split_path(path)
    head = json.dumps({"name": key, "metadata": meta}).encode()
    sep = uuid.uuid4().hex  # a boundary no payload contains (gcsfs's fixed one could occur in binary data)
    body = (f"--{sep}\nContent-Type: application/json; charset=UTF-8\n\n".encode() + head
            + f"\n--{sep}\nContent-Type: application/octet-stream\n\n".encode() + data + f"\n--{sep}--".encode())
    try:
        fs.call("POST", f"{fs._location}/upload/storage/v1/b/{{}}/o", bucket, uploadType="multipart",
                headers={"Content-Type": f'multipart/related; boundary="{sep}"'}, data=body,
                ifGenerationMatch=str(int(generation)))
    finally:
        fs.invalidate_cache(path)


def _write_token(fs: Any, protocol: str, path: str, url: str) -> Optional[str]:
    """The write token stored with the object at `path` (None if absent or untagged)."""
    def head() -> Optional[str]:
        try:
            if protocol == "s3":
                bucket, key, _ = fs.split_path(path)
                meta = fs.call_s3("head_object", Bucket=bucket, Key=key).get("Metadata") or {}
            else:
                fs.invalidate_cache(path)
                meta = fs.info(path).get("metadata") or {}
        except FileNotFoundError:
            return None
        return meta.get(WRITE_TOKEN)

    return retrying(head, url)


def _precondition_failed(e: BaseException) -> bool:
    if isinstance(e, FileExistsError):
        return True
    cause = e.__cause__
    resp = getattr(cause, "response", None) or getattr(e, "response", None)
    if resp:
        err = resp.get("Error", {})
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return err.get("Code") in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)
    return "PreconditionFailed" in str(e) or "412" in str(e)


@contextmanager
def _local_lock(path: str) -> Iterator[None]:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def append_line(url: str, line: str, options: Optional[Mapping[str, Any]] = None) -> None:
    """Append one text line to `url`, safe against concurrent appenders, at a cost of O(line).

    Local files use O_APPEND under a lock; s3:// and gs:// add one small object per line with a
    conditional create (pipeline/linelog.py), read back as one file by `read_bytes`/`read_text`.
    """
    text = line.rstrip("\n") + "\n"
    if is_local(url):
        p = local_path(url)
        with _local_lock(p):
            with open(p, "a", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        return
    if protocol_of(url) in ("s3", "gs"):
        from selfsup.pipeline import linelog

        linelog.append(url, text, options)
        return
    # e.g. memory://: one process, no contention, no conditional writes
    old = read_bytes(url, options=options) if exists(url, options) else b""
    write_bytes(url, old + text.encode(), options)


def arrow_filesystem(url: str, options: Optional[Mapping[str, Any]] = None) -> tuple[Any, str]:
    """(pyarrow filesystem or None, path) for libraries that take pyarrow (Ray Train's storage).

    Local paths return (None, absolute path); object stores go through the same fsspec
    filesystem (and credentials) as everything else here.
    """
    if is_local(url):
        return None, local_path(url)
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem(url, options, client_attempts=retries.ATTEMPTS)  # Ray Train's calls: no layer of ours
    return PyFileSystem(FSSpecHandler(fs)), path
