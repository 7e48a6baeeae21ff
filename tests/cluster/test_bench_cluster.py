"""`selfsup bench cluster`: its own multi-node cluster on this machine, stream nodes added one by one
under the same trainer world; every node count delivers the planned epoch exactly once."""
from __future__ import annotations

import json

import pytest

from tests.conftest import PHOTOS, run_cli

pytestmark = pytest.mark.cluster


def test_bench_cluster_rows_per_node_count(tmp_path, capfd):
    proc = run_cli("bench", "cluster", "--nodes", "2", "--samples", "256", "--size", "64", "--json",
                   "--data", str(PHOTOS), "--workdir", str(tmp_path / "bench"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    with capfd.disabled():
        print("\n" + "\n".join(proc.stderr.splitlines()[-6:]))
    rows = result["rows"]
    assert [r["nodes"] for r in rows] == [1, 2] and [r["streams"] for r in rows] == [2, 4]
    for r in rows:
        assert r["samples"] == 256  # 8 micro-batches of 32: the whole epoch, each sample once (checked inside)
        assert len(r["per_node"]) == r["nodes"] and all(v["cpu_s"] > 0 for v in r["per_node"].values())
        assert list(r["streams_per_node"].values()) == [2] * r["nodes"]  # balanced over the stream nodes
        assert r["samples_per_s"] > 0 and r["samples_per_cpu_s"] > 0 and 0 <= r["stall_pct"] <= 100
        assert r["other_cores"] >= 0
    assert rows[0]["scaling"] == 1.0
    assert rows[1]["scaling"] == pytest.approx(rows[1]["samples_per_s"] / rows[0]["samples_per_s"], abs=0.01)
    assert "stream nodes" in proc.stderr and "per CPU-s" in proc.stderr
