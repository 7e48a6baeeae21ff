"""Servers on 127.0.0.1 for benches and tests: a free port, waiting until it listens, and a server
process run for the length of a block (the S3 API of `s3server`, fake-gcs-server)."""
from __future__ import annotations

import socket
import subprocess
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0, alive: Optional[Callable[[], bool]] = None) -> None:
    """Block until something listens on 127.0.0.1:port; TimeoutError after `timeout` s, or at once when
    `alive()` says the server it waits for has exited."""
    deadline = time.time() + timeout
    while time.time() < deadline and (alive is None or alive()):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@contextmanager
def serving(argv: list[str], port: int) -> Iterator["subprocess.Popen[bytes]"]:
    """Run the server `argv` (quiet) while the block runs: wait until it listens on 127.0.0.1:port,
    yield its process, and stop it by its handle afterwards."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, alive=lambda: proc.poll() is None)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
