"""A Ray cluster whose worker nodes come and go with demand, on this machine: Ray's fake
multi-node node provider (`RAY_FAKE_CLUSTER=1`) behind a real `ray start --head` with an
autoscaling config, each launched node a real raylet.

`ray.cluster_utils.AutoscalingCluster` does the same but begins and ends with `ray stop --force`,
which ends every Ray process on the machine. This one runs `ray start --head` (free port, own temp
dir, own token) as the leader of a new session: every process of the cluster, the nodes the
autoscaler launches included, stays in that session, and `stop()` ends exactly the processes of
that session id.
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
        self.sid: Optional[int] = None  # the session id of every process of this cluster
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

    @property
    def auth_env(self) -> dict[str, str]:
        """Token auth settings for every side (`ray start` turns token auth on when it finds a token
        anywhere, ~/.ray included): this cluster's own token, in its temp dir."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.tmp / "auth_token")}

    def start(self) -> None:
        """`ray start --head` with the autoscaling config; set `auth_env` in this process before connecting."""
        config = self.tmp / "autoscaling.json"
        config.write_text(json.dumps(self.config))
        token = self.tmp / "auth_token"
        token.write_text(os.urandom(24).hex())
        token.chmod(0o600)
        env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
               "RAY_USAGE_STATS_ENABLED": "0", **self.auth_env}
        ray = str(Path(sys.executable).with_name("ray"))
        starter = subprocess.Popen([ray, "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
                                    "--num-cpus=0", f"--temp-dir={self.tmp / 'ray'}", f"--autoscaling-config={config}",
                                    "--include-dashboard=false", "--disable-usage-stats"],
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
        self.sid = starter.pid  # a session leader's pid is its session id
        output, _ = starter.communicate(timeout=120)
        if starter.returncode:
            self.stop()
            raise RuntimeError(f"ray start --head failed ({starter.returncode}): {output[-2000:]}")

    def ours(self) -> list[int]:
        """Pids of this cluster's processes: those in the session `ray start` led (by session id)."""
        if self.sid is None:
            return []
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[3]) == self.sid:  # field 6: the session id
                found.append(int(entry))
        return found

    def stop(self, timeout: float = 30.0) -> None:
        """End this cluster's processes, nothing else's: SIGTERM, then SIGKILL to what is left."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.ours():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if wait_for(lambda: not self.ours(), timeout / 2, every=0.2) is not None:
                return


def wait_for(predicate: Any, timeout: float, every: float = 0.5) -> Optional[float]:
    """Seconds until `predicate()` held, or None if it did not within `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(every)
    return None
