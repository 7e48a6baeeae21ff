"""Storage on local paths, memory://, the S3 API (moto_server) and the GCS API (fake-gcs-server):
atomic writes, ranges, conditional writes, and the bound on retries."""
from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time

import pytest

from selfsup.pipeline import retries, storage


@pytest.fixture(params=["local", "s3", "gs", "memory"])
def root(request, tmp_path):
    """(a folder URL, the storage options that reach it)."""
    if request.param == "local":
        return str(tmp_path / "store"), None
    if request.param in ("s3", "gs"):
        store = request.getfixturevalue("moto_s3" if request.param == "s3" else "fake_gcs")
        return store.bucket("store") + "/prefix", store.options
    return f"memory://selfsup-test-{os.getpid()}-{id(request)}", None


def test_write_read_range_list_delete(root):
    base, opts = root
    url = storage.join(base, "a", "b.bin")
    storage.write_bytes(url, b"0123456789", opts)
    assert storage.read_bytes(url, options=opts) == b"0123456789"
    assert storage.read_bytes(url, 3, 7, opts) == b"3456"
    assert storage.size(url, opts) == 10
    assert storage.exists(url, opts)
    assert storage.listdir(storage.join(base, "a"), opts) == [url]
    storage.delete(url, options=opts)
    assert not storage.exists(url, opts)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(url, options=opts)


def test_conditional_writes(root):
    base, opts = root
    url = storage.join(base, "lease.json")
    if base.startswith("memory://"):
        with pytest.raises(ValueError, match="not supported on memory://"):
            storage.write_if_absent(url, b"one", opts)
        return
    assert storage.write_if_absent(url, b"one", opts)
    assert not storage.write_if_absent(url, b"two", opts)
    data, version = storage.read_versioned(url, opts)
    assert data == b"one"
    assert storage.write_if_version(url, b"three", version or "", opts)
    assert not storage.write_if_version(url, b"four", version or "", opts)  # stale version loses
    assert storage.read_versioned(url, opts)[0] == b"three"
    assert storage.read_versioned(storage.join(base, "absent.json"), opts) == (None, None)


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


class Outage:
    """An HTTP server on 127.0.0.1 answering every request 503 Service Unavailable, counting them."""

    REPLY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\nConnection: close\r\n"
             b"Content-Length: 71\r\n\r\n<Error><Code>ServiceUnavailable</Code><Message>outage</Message></Error>")

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests, self.done = 0, threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            with conn:
                conn.settimeout(2)
                head = b""
                while b"\r\n\r\n" not in head and (chunk := conn.recv(4096)):
                    head += chunk
                self.requests += 1
                conn.sendall(self.REPLY)

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)
        self.sock.close()


def test_an_outage_fails_within_the_stated_bound_after_one_layer_of_retries(monkeypatch):
    """s3fs's and botocore's retries are off: ATTEMPTS requests, no more, and at most wait_bound seconds asleep."""
    monkeypatch.setattr(retries, "ATTEMPTS", 3)
    bound = retries.wait_bound(3)
    assert bound == 1.5  # 0.5 + 1
    server = Outage()
    opts = {"endpoint_url": server.endpoint, "key": "AKIAOUTAGEKEY0000000", "secret": "outage-secret"}
    try:
        start = time.monotonic()
        with pytest.raises(retries.StorageUnavailable) as err:
            storage.read_bytes("s3://bucket/data/shard-000.tar", 0, 10, opts)
        took = time.monotonic() - start
    finally:
        server.close()
    assert server.requests == 3  # one layer: three layers of 3-5 attempts each would make dozens
    assert 0.5 * bound <= took <= bound + 3.0, took  # jitter sleeps at least half of each step
    text = str(err.value)
    assert text.startswith("s3://bucket/data/shard-000.tar: ") and "after 3 attempt(s)" in text
    assert "outage-secret" not in text and "AKIAOUTAGEKEY" not in text


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
