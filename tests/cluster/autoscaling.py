"""A Ray cluster whose worker nodes come and go with demand, on this machine: Ray's fake
multi-node node provider (`RAY_FAKE_CLUSTER=1`) behind a real `ray start --head` with an
autoscaling config, each launched node a real raylet.

`ray.cluster_utils.AutoscalingCluster` does the same but begins and ends with `ray stop --force`,
which ends every Ray process on the machine. This one starts its head on a free port with its own
temp dir, and stops only the processes whose command line names that temp dir or port (the
workers of its raylets exit with them).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from tests.conftest import free_port

HEAD = "ray.head.default"


class FakeAutoscalingCluster:
    """`start()` a head (no work resources) whose autoscaler launches `node_types` on demand."""

    def __init__(self, tmp: Path, node_types: dict[str, dict[str, Any]], idle_timeout_minutes: float = 0.25) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.config = {
            "cluster_name": "selfsup-fake", "max_workers": sum(t.get("max_workers", 1) for t in node_types.values()),
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": self.address},
            "available_node_types": {HEAD: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                                     **node_types},
            "head_node_type": HEAD, "auth": {}, "upscaling_speed": 1.0,
            "idle_timeout_minutes": idle_timeout_minutes, "docker": {}, "initialization_commands": [],
            "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
            "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {},
            "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [],
            "rsync_filter": [],
        }

    def start(self) -> None:
        config = self.tmp / "autoscaling.json"
        config.write_text(json.dumps(self.config))
        env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
               "RAY_USAGE_STATS_ENABLED": "0"}
        ray = str(Path(sys.executable).with_name("ray"))
        subprocess.run([ray, "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
                        "--num-cpus=0", f"--temp-dir={self.tmp / 'ray'}", f"--autoscaling-config={config}",
                        "--include-dashboard=false", "--disable-usage-stats"],
                       env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)

    def ours(self) -> list[Any]:
        """This cluster's processes: those whose command line names its temp dir or GCS port."""
        import psutil

        marks = (str(self.tmp), f":{self.port}")
        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["pid"] != os.getpid() and any(m in cmd for m in marks):
                found.append(p)
        return found

    def stop(self, timeout: float = 30.0) -> None:
        """End this cluster's processes (raylets first; their workers follow), nothing else's."""
        import psutil

        procs = self.ours()
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=timeout / 2)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=timeout / 2)

    def node_counts(self) -> dict[str, int]:
        """Alive nodes by type, read from the GCS (the head counts as HEAD)."""
        import ray

        counts: dict[str, int] = {}
        for n in ray.nodes():
            if not n["Alive"]:
                continue
            kind = self.type_of(n["Resources"])
            counts[kind] = counts.get(kind, 0) + 1
        return counts

    def type_of(self, resources: dict[str, float]) -> str:
        for name, spec in self.config["available_node_types"].items():
            marks = [r for r in spec["resources"] if r not in ("CPU", "GPU", "object_store_memory")]
            if marks and all(r in resources for r in marks):
                return name
        return HEAD


def wait_for(predicate: Any, timeout: float, every: float = 0.5) -> Optional[float]:
    """Seconds until `predicate()` held, or None if it did not within `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(every)
    return None
