"""Storage on local paths, memory:// and the S3 API (moto_server): atomic writes, ranges, leases."""
from __future__ import annotations

import errno
import logging
import os

import pytest

from selfsup.pipeline import storage


@pytest.fixture(params=["local", "s3", "memory"])
def root(request, tmp_path, moto_s3):
    if request.param == "local":
        return str(tmp_path / "store")
    if request.param == "s3":
        return moto_s3.bucket("store") + "/prefix"
    return f"memory://selfsup-test-{os.getpid()}-{id(request)}"


def test_write_read_range_list_delete(root):
    url = storage.join(root, "a", "b.bin")
    storage.write_bytes(url, b"0123456789")
    assert storage.read_bytes(url) == b"0123456789"
    assert storage.read_bytes(url, 3, 7) == b"3456"
    assert storage.size(url) == 10
    assert storage.exists(url)
    assert storage.listdir(storage.join(root, "a")) == [url]
    storage.delete(url)
    assert not storage.exists(url)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(url)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_conditional_writes(kind, tmp_path, moto_s3):
    base = str(tmp_path) if kind == "local" else moto_s3.bucket("lease")
    url = storage.join(base, "lease.json")
    assert storage.write_if_absent(url, b"one")
    assert not storage.write_if_absent(url, b"two")
    data, version = storage.read_versioned(url)
    assert data == b"one"
    assert storage.write_if_version(url, b"three", version)
    assert not storage.write_if_version(url, b"four", version)  # stale version loses
    assert storage.read_bytes(url) == b"three"


def test_conditional_writes_refused_where_unsupported():
    with pytest.raises(ValueError, match="not supported on memory://"):
        storage.write_if_absent("memory://x/lease.json", b"1")


def test_transient_errors_are_retried_then_raised(caplog):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError(errno.ECONNRESET, "reset")
        return "ok"

    with caplog.at_level(logging.WARNING):
        assert storage.retrying(flaky, "s3://bucket/key", base_delay=0.001) == "ok"
    assert len(calls) == 3 and "retry" in caplog.text

    def missing():
        calls.append(1)
        raise FileNotFoundError("gone")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        storage.retrying(missing, "x", base_delay=0.001)
    assert len(calls) == 1  # not transient: no retry


def test_credentials_are_redacted():
    opts = {"key": "AKIA123", "secret": "s3cr3t", "endpoint_url": "http://h", "client_kwargs": {"aws_session_token": "t"}}
    red = storage.redact(opts)
    assert red["key"] == "***" and red["secret"] == "***" and red["client_kwargs"]["aws_session_token"] == "***"
    assert red["endpoint_url"] == "http://h"
    assert storage.redact_url("s3://user:pw@host/bucket/k?X-Amz-Signature=abc") == "s3://***@host/bucket/k"


def test_unwritable_destination_is_named(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.geteuid() == 0:
            pytest.skip("root ignores directory permissions")
        with pytest.raises(PermissionError, match="not writable"):
            storage.check_writable(str(ro))
    finally:
        ro.chmod(0o700)


def test_a_local_range_past_the_end_is_refused_before_it_is_allocated(tmp_path):
    """A shard index may claim any range; a local read allocates the range before reading it."""
    path = tmp_path / "small.bin"
    path.write_bytes(b"0123456789")
    with pytest.raises(OSError, match=r"range \[2, 10000000000000\) runs past the end of the file \(10 bytes\)"):
        storage.read_bytes(str(path), 2, 10**13)
    assert storage.read_bytes(str(path), 2, 5) == b"234"
