"""Shared fixtures: real data from ../shared/datasets, an S3 API on moto_server, one local Ray cluster."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
FMNIST = SHARED / "fashion-mnist"
FSDD = SHARED / "fsdd" / "recordings"
VIDEO = SHARED / "video"
PHOTOS = SHARED / "photos"

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0) -> None:
    """Block until something listens on 127.0.0.1:port."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


class MotoS3:
    """A moto_server on loopback; `bucket()` creates a fresh bucket and returns its s3:// URL."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._n = 0

    def bucket(self, prefix: str = "b") -> str:
        import boto3

        self._n += 1
        name = f"{prefix}-{self._n}-{os.getpid()}".lower()
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1").create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    """Serve the S3 API on 127.0.0.1 for the whole session and point AWS settings at it."""
    port = free_port()
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or "moto_server"
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing-secret",
                      AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1")
    try:
        wait_port(port)
        yield MotoS3(endpoint)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def ray_cluster(moto_s3: MotoS3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One local Ray instance for the session, on 127.0.0.1, its temp dir inside pytest's tmp."""
    import ray

    tmp = tmp_path_factory.mktemp("ray")
    ray.init(num_cpus=8, include_dashboard=False, _temp_dir=str(tmp), _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `selfsup ARGS` in a subprocess; returns the completed process (text output)."""
    return subprocess.run([sys.executable, "-m", "selfsup.jobs.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=timeout)
