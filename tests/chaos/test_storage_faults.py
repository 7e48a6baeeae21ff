"""Storage under faults on the real S3 and GCS APIs: replies lost after the store applied a write,
concurrent writers, costs of appends.

The faults are injected on the wire by a loopback proxy between the client (s3fs, gcsfs) and the
store (moto_server, fake-gcs-server; tests/chaos/s3proxy.py), so the retry layer runs as it would
against S3 or GCS: selfsup's on S3, gcsfs's own on GCS.
"""
from __future__ import annotations

import json
import threading
from typing import Any, Iterator

import pytest

from selfsup.pipeline import storage
from selfsup.pipeline.lease import Lease
from tests.chaos.s3proxy import S3Proxy


WRITE = {"s3": "PUT", "gs": "POST"}  # the method of an upload


@pytest.fixture
def proxy(object_store) -> Iterator[S3Proxy]:
    with S3Proxy(object_store.endpoint) as p:
        yield p


@pytest.fixture
def opts(object_store, proxy) -> dict[str, Any]:
    """Storage options that go through the proxy."""
    return {**(object_store.options or {}), "endpoint_url": proxy.endpoint}


def write_method(url: str) -> str:
    return WRITE[storage.protocol_of(url)]


def test_lost_reply_on_create_is_read_back(object_store, proxy, opts):
    url = object_store.bucket("lost") + "/obj.json"
    fault = proxy.drop_reply(write_method(url), "/obj.json")
    assert storage.write_if_absent(url, b"mine", opts)  # it wrote: the retry's 412 is its own write
    assert fault.fired == 1
    assert storage.read_bytes(url, options=opts) == b"mine"
    assert not storage.write_if_absent(url, b"theirs", opts)  # a genuine conflict is still refused


def test_lost_reply_on_replace_is_read_back(object_store, proxy, opts):
    url = object_store.bucket("lost") + "/obj.json"
    assert storage.write_if_absent(url, b"one", opts)
    _, version = storage.read_versioned(url, opts)
    fault = proxy.drop_reply(write_method(url), "/obj.json")  # counts from now: the replacing PUT
    assert storage.write_if_version(url, b"two", version or "", opts)
    assert fault.fired == 1
    assert storage.read_bytes(url, options=opts) == b"two"
    assert not storage.write_if_version(url, b"three", version or "", opts)  # stale version still loses


def test_lost_reply_on_append_neither_fails_nor_doubles(object_store, proxy, opts):
    url = object_store.bucket("lost") + "/log.jsonl"
    fault = proxy.drop_reply(write_method(url), "/log.jsonl", nth=2)
    for i in range(4):
        storage.append_line(url, f"line-{i}", opts)
    assert fault.fired == 1
    assert storage.read_text(url, opts).splitlines() == [f"line-{i}" for i in range(4)]


def test_lost_reply_on_lease_acquire_and_renew(object_store, proxy, opts):
    url = object_store.bucket("lease") + "/retrain.lease"
    lease = Lease(url, seconds=60, options=opts)
    fault = proxy.drop_reply(write_method(url), "/retrain.lease", nth=1)
    taken = lease.acquire()
    assert fault.fired == 1
    assert taken is not None and not taken.took_over  # it holds the lease, so it says so
    assert (lease.holder() or {}).get("owner") == lease.owner
    assert Lease(url, seconds=60, options=opts).acquire() is None  # and nobody else gets it

    fault = proxy.drop_reply(write_method(url), "/retrain.lease")  # the next upload: the renewal
    lease.renew()  # no false LeaseLost
    lease.update(run="r1")
    assert fault.fired == 1 and not lease.lost.is_set()
    assert (lease.holder() or {}).get("run") == "r1"
    lease.release()
    assert lease.holder() is None


def _put_bytes(proxy: S3Proxy, name: str) -> int:
    return sum(r.body_bytes for r in proxy.requests("PUT", name) if r.status == 200)


def test_append_costs_one_line_however_long_the_file(moto_s3):
    with S3Proxy(moto_s3.endpoint) as proxy:
        _append_windows(proxy, moto_s3.bucket("cost") + "/metrics.jsonl", {"endpoint_url": proxy.endpoint})


def _append_windows(proxy: S3Proxy, url: str, opts: dict[str, Any]) -> None:
    line = json.dumps({"step": 0, "loss": 1.0, "pad": "x" * 80})
    window, costs = 64, []
    for w in range(4):
        before = _put_bytes(proxy, "/metrics.jsonl")
        for i in range(window):
            storage.append_line(url, line.replace('"step": 0', f'"step": {w * window + i}'), opts)
        costs.append(_put_bytes(proxy, "/metrics.jsonl") - before)
    # bytes uploaded per window of appends stay flat (a rewrite per line grows them with the file)
    assert max(costs) <= 1.25 * min(costs), costs
    assert costs[-1] <= 3 * window * (len(line) + 8), costs
    steps = [json.loads(x)["step"] for x in storage.read_text(url, opts).splitlines()]
    assert steps == list(range(4 * window))


def test_concurrent_appenders_lose_nothing_and_keep_order(object_store):
    url = object_store.bucket("append") + "/quarantine.jsonl"
    opts = object_store.options
    writers, per = 4, 40  # 160 lines: crosses chunk merges while others append

    def work(i: int) -> None:
        for j in range(per):
            storage.append_line(url, f"{i}-{j}", opts)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = storage.read_text(url, opts).splitlines()
    assert sorted(lines) == sorted(f"{i}-{j}" for i in range(writers) for j in range(per))
    for i in range(writers):  # each writer's lines keep the order it appended them in
        assert [x for x in lines if x.startswith(f"{i}-")] == [f"{i}-{j}" for j in range(per)]


def test_appending_to_a_whole_file_keeps_it(moto_s3):
    url = moto_s3.bucket("legacy") + "/retrain-log.jsonl"
    storage.write_text(url, "a\nb\n")  # written whole, e.g. by an older selfsup
    storage.append_line(url, "c")
    assert storage.exists(url)
    assert storage.listdir(url.rsplit("/", 1)[0]) == [url]
    assert storage.read_text(url) == "a\nb\nc\n"
    assert storage.size(url) == 6
    storage.delete(url)
    assert not storage.exists(url)
    with pytest.raises(FileNotFoundError):
        storage.read_text(url)


def test_concurrent_conditional_creates_of_one_key_let_exactly_one_win(object_store):
    """The stores' guarantee that every concurrent-writer test stands on (tests/s3server.py keeps it for moto)."""
    root, opts = object_store.bucket("race"), object_store.options
    for key in range(10):
        url = f"{root}/k-{key}"
        barrier, wins = threading.Barrier(8), []

        def create(i: int) -> None:
            barrier.wait()
            if storage.write_if_absent(url, f"writer {i}".encode(), opts):
                wins.append(i)

        threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1, (key, wins)
        assert storage.read_text(url, opts) == f"writer {wins[0]}"
