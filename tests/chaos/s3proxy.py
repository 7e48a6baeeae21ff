"""A loopback HTTP proxy in front of moto_server (or fake-gcs-server) that counts uploads and injects faults.

    with S3Proxy(moto_s3.endpoint) as proxy:
        opts = {"endpoint_url": proxy.endpoint}
        proxy.drop_reply(method="PUT", path_contains="/lease.json", nth=1)  # moto applies it; the client hears nothing

A fault matches a request by method and a substring of its path; a GCS multipart upload (whose object
name travels in its body, not its path) also matches on "/<object name>".

Every request is forwarded whole to moto; a dropped reply is read from moto (so the write happened) and then
the client's connection is closed without a byte, which is what a lost response looks like on the wire.
"""
from __future__ import annotations

import http.client
import re
import threading
import time
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import urlsplit

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


@dataclass
class Fault:
    """Drop the reply (or answer `status`) of the `nth` request matching method and path (every one if nth=0)."""

    method: str
    path_contains: str
    nth: int
    status: Optional[int] = None  # None: drop the reply after moto applied the request
    seen: int = 0
    fired: int = 0
    delay: Optional[float] = None  # hold the request this long, then forward it (`arrived` set on arrival)
    arrived: threading.Event = field(default_factory=threading.Event)


@dataclass
class Request:
    method: str
    path: str
    body_bytes: int
    status: Optional[int] = None


@dataclass
class _State:
    faults: list[Fault] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _upload_name(headers: Message, body: bytes) -> str:
    """" /<object name>" of a GCS multipart upload (its JSON metadata part), else ""."""
    if "multipart/related" not in headers.get("Content-Type", ""):
        return ""
    m = re.search(rb'"name": ?"([^"]+)"', body[:4096])
    return " /" + m.group(1).decode() if m else ""


class S3Proxy:
    """ThreadingHTTPServer on 127.0.0.1 forwarding to `upstream` (http://127.0.0.1:PORT)."""

    def __init__(self, upstream: str) -> None:
        up = urlsplit(upstream)
        self.state = _State()
        state, host, port = self.state, up.hostname or "127.0.0.1", up.port or 80

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                rec = Request(self.command, self.path + _upload_name(self.headers, body), len(body))
                with state.lock:
                    state.requests.append(rec)
                    fault = None
                    for f in state.faults:
                        if f.method == self.command and f.path_contains in rec.path:
                            f.seen += 1
                            if f.seen == f.nth or f.nth == 0:
                                f.fired += 1
                                fault = f
                if fault is not None and fault.delay is not None:
                    fault.arrived.set()
                    time.sleep(fault.delay)
                    fault = None  # then forwarded and answered as usual
                if fault is not None and fault.status is not None:
                    rec.status = fault.status
                    msg = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
                    self.send_response(fault.status)
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(host, port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    rec.status = resp.status
                    resp_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_HEADERS]
                finally:
                    conn.close()
                if fault is not None:  # moto applied it; the client never hears back
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.send_response_only(resp.status, resp.reason)
                for k, v in resp_headers:
                    if k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data) if self.command != "HEAD"
                                                       else resp.getheader("Content-Length") or 0))
                self.end_headers()
                if self.command != "HEAD":
                    try:
                        self.wfile.write(data)
                    except (BrokenPipeError, ConnectionResetError):  # the client gave up (its own timeout)
                        self.close_connection = True

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="s3proxy", daemon=True)

    def __enter__(self) -> "S3Proxy":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)

    def drop_reply(self, method: str, path_contains: str, nth: int = 1) -> Fault:
        """Lose the reply of the nth matching request after moto has applied it."""
        return self._add(Fault(method, path_contains, nth))

    def fail(self, method: str, path_contains: str, nth: int = 1, status: int = 503) -> Fault:
        """Answer the nth matching request (every one if nth=0) with `status` without forwarding it."""
        return self._add(Fault(method, path_contains, nth, status))

    def hold(self, method: str, path_contains: str, seconds: float, nth: int = 1) -> Fault:
        """Hold the nth matching request `seconds` before forwarding it (a slow upload); the fault's
        `arrived` event is set when it arrives."""
        return self._add(Fault(method, path_contains, nth, delay=seconds))

    def _add(self, fault: Fault) -> Fault:
        with self.state.lock:
            self.state.faults.append(fault)
        return fault

    def requests(self, method: Optional[str] = None, path_contains: str = "") -> list[Request]:
        """The requests seen so far (optionally only those matching)."""
        with self.state.lock:
            return [r for r in self.state.requests
                    if (method is None or r.method == method) and path_contains in r.path]

    def reset(self) -> None:
        """Forget faults and recorded requests."""
        with self.state.lock:
            self.state.faults.clear()
            self.state.requests.clear()
