"""Leases in storage: one holder at a time, taken and renewed with conditional writes, with an expiry.

    lease = Lease("s3://b/runs/retrain.lease", seconds=600)
    taken = lease.acquire()           # None: someone else holds it; else what the previous holder left
    with lease.renewing():            # a thread pushes the expiry forward every seconds/3
        lease.update(run="retrain-...")
        ...
    lease.release()

The lease object is JSON: {"owner", "expires" (unix time), "released", ...fields the holder set}.
Taking it is `write_if_absent` on a missing object, or `write_if_version` over a released or
expired one, so of two contenders exactly one wins. A holder that stops renewing (killed,
partitioned) loses the lease once `expires` passes; the next taker sees its fields (e.g. the run
it was training) in `Acquired.previous` and can resume that work; a holder that releases with
`handover=True` among its fields passes its work on the same way. Clocks are assumed to agree to
well within `seconds`.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional

from selfsup.pipeline import storage

log = logging.getLogger(__name__)
SUPPORTED = ("file", "s3", "gs")


class LeaseLost(RuntimeError):
    """The lease expired and another holder took it (or it vanished)."""


@dataclass(frozen=True)
class Acquired:
    """A taken lease: `previous` is the body of an expired (or handed-over) lease taken over ({} otherwise)."""

    previous: dict[str, Any]

    @property
    def took_over(self) -> bool:
        return bool(self.previous)


def check_supported(url: str) -> None:
    """Raise ValueError unless `url`'s storage offers the conditional writes a lease needs."""
    protocol = storage.protocol_of(url)
    if protocol not in SUPPORTED:
        raise ValueError(f"{storage.redact_url(url)}: leases need conditional writes, which {protocol}:// "
                         "does not offer; put the runs root on a local path, s3:// (If-None-Match/If-Match) "
                         "or gs:// (generation preconditions)")


def owner_id() -> str:
    """host-pid-random: names this process in lease bodies and logs."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Lease:
    """One lease object at `url`, held for `seconds` past each renewal."""

    def __init__(self, url: str, seconds: float, options: Optional[Mapping[str, Any]] = None,
                 owner: Optional[str] = None) -> None:
        check_supported(url)
        if seconds <= 0:
            raise ValueError(f"lease seconds={seconds} must be positive")
        self.url, self.seconds, self.options = url, float(seconds), options
        self.owner = owner or owner_id()
        self.fields: dict[str, Any] = {}
        self.lost = threading.Event()
        self._version: Optional[str] = None
        self._lock = threading.Lock()

    def read(self) -> Optional[dict[str, Any]]:
        """The current lease body, or None when there is none."""
        return read_lease(self.url, self.options)

    def acquire(self) -> Optional[Acquired]:
        """Take the lease if it is free, released or expired; None when another live holder has it."""
        with self._lock:
            data, version = storage.read_versioned(self.url, self.options)
            body = self._body()
            if data is None:
                if not storage.write_if_absent(self.url, body, self.options):
                    return None
                self._version = self._confirm(body)
                return Acquired({}) if self._version else None
            old = _parse(data)
            if not old.get("released") and float(old.get("expires", 0)) > time.time():
                return None
            if not storage.write_if_version(self.url, body, version or "", self.options):
                return None
            self._version = self._confirm(body)
            if not self._version:
                return None
            previous = {} if old.get("released") and not old.get("handover") else old
            return Acquired(previous)

    def holder(self) -> Optional[dict[str, Any]]:
        """The live holder's body (None when the lease is free, released or expired)."""
        body = self.read()
        if body is None or body.get("released") or float(body.get("expires", 0)) <= time.time():
            return None
        return body

    def update(self, **fields: Any) -> None:
        """Record fields in the lease (and renew it); raises LeaseLost if it is no longer ours."""
        with self._lock:
            self.fields.update(fields)
            self._write(self._body())

    def renew(self) -> None:
        """Push the expiry `seconds` into the future; raises LeaseLost if it is no longer ours."""
        with self._lock:
            self._write(self._body())

    def release(self) -> None:
        """Mark the lease released (a no-op when it was lost meanwhile)."""
        with self._lock:
            if self._version is None or self.lost.is_set():
                return
            body = json.dumps({"owner": self.owner, "released": True, "released_at": time.time(),
                               **self.fields}).encode()
            if storage.write_if_version(self.url, body, self._version, self.options):
                self._version = None

    @contextmanager
    def renewing(self, period: Optional[float] = None) -> Iterator["Lease"]:
        """Renew from a daemon thread while the block runs; `lost` is set if a renewal fails."""
        stop = threading.Event()
        every = period or max(self.seconds / 3.0, 0.05)

        def loop() -> None:
            while not stop.wait(every):
                try:
                    self.renew()
                except LeaseLost:
                    log.error("lease %s was taken by another holder; this one must not commit results",
                              storage.redact_url(self.url))
                    return
                except OSError as e:  # storage trouble: try again next period, the expiry has slack
                    log.warning("lease renewal failed (%s); retrying", e)

        thread = threading.Thread(target=loop, name="lease-renewal", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(5)

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({**self.fields, "owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "renewed": now, "expires": now + self.seconds, "released": False,
                           "nonce": uuid.uuid4().hex}).encode()

    def _write(self, body: bytes) -> None:
        if self._version is None or self.lost.is_set():
            self.lost.set()
            raise LeaseLost(f"lease {storage.redact_url(self.url)} is not held by {self.owner}")
        if not storage.write_if_version(self.url, body, self._version, self.options):
            self.lost.set()
            raise LeaseLost(f"lease {storage.redact_url(self.url)} was taken over by another holder")
        version = self._confirm(body)
        if version is None:
            self.lost.set()
            raise LeaseLost(f"lease {storage.redact_url(self.url)} changed right after renewal")
        self._version = version

    def _confirm(self, body: bytes) -> Optional[str]:
        """The version of our own write (read back; None if someone else's body is already there)."""
        data, version = storage.read_versioned(self.url, self.options)
        return version if data == body else None


def read_lease(url: str, options: Optional[Mapping[str, Any]] = None) -> Optional[dict[str, Any]]:
    """The body of the lease at `url` (for watchers that do not hold it), or None when there is none."""
    data, _ = storage.read_versioned(url, options)
    return _parse(data) if data is not None else None


def _parse(data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"expires": 0}  # unreadable: treat as expired so it can be taken over
    return body if isinstance(body, dict) else {"expires": 0}
