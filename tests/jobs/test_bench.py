"""`selfsup bench pipeline` end to end on a few real photos: every variant runs and the report is complete."""
from __future__ import annotations

import json

import pytest

from tests.conftest import PHOTOS, run_cli

FIGURES = ("kernel", "selfsup", "dataloader", "ray_data", "torchvision_default")
RATIOS = ("efficiency", "vs_dataloader", "vs_ray_data", "vs_torchvision_default")


def test_bench_pipeline_image_json(tmp_path):
    proc = run_cli("bench", "pipeline", "--modality", "image", "--streams", "1", "--samples", "32",
                   "--batch-size", "8", "--size", "64", "--repeats", "1", "--json",
                   "--data", str(PHOTOS), "--workdir", str(tmp_path / "bench"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # stdout holds the JSON object only; the table went to stderr
    assert (result["modality"], result["streams"], result["samples"], result["size"]) == ("image", 1, 32, 64)
    for key in FIGURES + RATIOS:
        assert isinstance(result[key], float) and result[key] > 0, (key, result[key])
    assert result["efficiency"] == pytest.approx(result["selfsup"] / result["kernel"])
    assert result["vs_dataloader"] == pytest.approx(result["selfsup"] / result["dataloader"])
    assert 0 <= result["stall_pct"] <= 100
    assert 0 < result["ttfb_warm_s"] < 60 and 0 < result["ttfb_cold_s"] < 120  # fresh actors start, then warm
    assert "time to first batch: cold" in proc.stderr
    assert set(result["floors"]) == set(RATIOS)
    for floor in result["floors"].values():
        assert floor["pass"] == (floor["value"] >= floor["floor"])
    assert "efficiency" in proc.stderr and "samples/s" in proc.stderr


@pytest.mark.parametrize("flags, named", [(["--ranks", "3"], "--streams-per-node 2 and --ranks 3"),
                                          (["--nodes", "0"], "--nodes"), (["--node-cpus", "0"], "--node-cpus 0.0"),
                                          (["--samples", "16"], "--samples 16")])
def test_bench_cluster_refuses_options_that_cannot_work_before_starting_anything(flags, named, tmp_path):
    proc = run_cli("bench", "cluster", *flags, "--workdir", str(tmp_path / "bench"))
    assert proc.returncode == 2 and named in proc.stderr, proc.stderr
    assert not (tmp_path / "bench").exists()  # no shards written, no cluster started
