"""`selfsup bench pipeline` end to end on a few real photos: every variant runs and the report is complete."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import PHOTOS, run_cli

FIGURES = ("kernel", "best_library", "selfsup", "dataloader", "ray_data", "torchvision_default")
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
    per_cpu = result["samples_per_cpu_s"]  # rounded to 0.1
    assert result["vs_best_library"] == pytest.approx(per_cpu["kernel"] / per_cpu["best_library"], rel=0.05)
    assert result["vs_dataloader"] == pytest.approx(result["selfsup"] / result["dataloader"])
    assert 0 <= result["stall_pct"] <= 100
    assert 0 < result["ttfb_warm_s"] < 60 and 0 < result["ttfb_cold_s"] < 120  # fresh actors start, then warm
    assert "time to first batch: cold" in proc.stderr
    assert 0.3 < result["stream_kernel_share"] <= 1 and 0 <= result["outside_streams_share"] < 1
    assert "went to decode and views" in proc.stderr
    assert set(result["floors"]) == set(RATIOS) | {"vs_best_library", "stream_kernel_share"}
    for floor in result["floors"].values():
        assert floor["pass"] == (floor["value"] >= floor["floor"])
    assert "efficiency" in proc.stderr and "samples/s" in proc.stderr and "vs_best_library" in proc.stderr


@pytest.mark.parametrize("recipe", ["simclr", "byol"])
def test_best_library_variant_makes_the_kernels_shapes_and_dtypes(recipe):
    from selfsup.jobs.bench.best_library import ImageAlbumentations, skip_line
    from selfsup.pipeline.modalities import make_modality

    data = sorted(PHOTOS.glob("*.jpg"))[0].read_bytes()
    args = {"size": 64, "recipe": recipe}
    ours = make_modality("image", **args)
    want = ours.sample(ours.decode({"jpg": data}), np.random.default_rng(0), True)
    library = ImageAlbumentations(args)
    got, again = library(data), library(data)
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == {k: (v.shape, v.dtype) for k, v in want.items()}
    assert got["view1"].tobytes() != again["view1"].tobytes()  # random views, drawn anew per call
    assert skip_line("image") is None and "images only" in str(skip_line("audio"))
    with pytest.raises(ValueError, match="recipe='single'"):
        ImageAlbumentations({"size": 64, "recipe": "single"})


@pytest.mark.parametrize("flags, named", [(["--ranks", "3"], "--streams-per-node 2 and --ranks 3"),
                                          (["--nodes", "0"], "--nodes"), (["--node-cpus", "0"], "--node-cpus 0.0"),
                                          (["--samples", "16"], "--samples 16")])
def test_bench_cluster_refuses_options_that_cannot_work_before_starting_anything(flags, named, tmp_path):
    proc = run_cli("bench", "cluster", *flags, "--workdir", str(tmp_path / "bench"))
    assert proc.returncode == 2 and named in proc.stderr, proc.stderr
    assert not (tmp_path / "bench").exists()  # no shards written, no cluster started


def test_bench_pipeline_s3_against_local_with_the_servers_cpu_apart(tmp_path):
    proc = run_cli("bench", "pipeline", "--modality", "image", "--storage", "s3", "--streams", "1", "--samples",
                   "16", "--batch-size", "8", "--size", "64", "--repeats", "1", "--json",
                   "--data", str(PHOTOS), "--workdir", str(tmp_path / "bench"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    local, s3 = result["local"], result["s3"]
    # the same data; the warm-up batches around the epoch differ (the plan's order depends on the shard URLs)
    assert local["reads"] > 0 and s3["reads"] > 0 and s3["read_mb"] == pytest.approx(local["read_mb"], rel=0.1)
    assert result["s3_vs_local"] == pytest.approx(s3["samples_per_s"] / local["samples_per_s"])
    assert s3["server_cores"] > local["server_cores"] >= 0  # moto serves the S3 runs only
    assert result["s3_vs_local_per_cpu"] == pytest.approx(s3["per_cpu_s"] / local["per_cpu_s"])
    assert "S3 (moto on 127.0.0.1) / local disk" in proc.stderr and "server excluded" in proc.stderr


def test_bench_growth_reads_a_streams_memory_over_both_epochs_and_after_the_same_work(tmp_path):
    import subprocess
    import sys

    script = ("import json, sys; from selfsup.jobs.bench.growth import GrowthOptions, bench_growth; "
              "print(json.dumps(bench_growth(GrowthOptions(shards=2, per_shard=4, shard_factor=2, sample_factor=2, "
              "batch_size=4, size=32, data=sys.argv[1], workdir=sys.argv[2]))))")
    proc = subprocess.run([sys.executable, "-c", script, str(PHOTOS), str(tmp_path / "grow")],  # its own Ray
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert "after the same batches" in proc.stderr
    small, big = result["datasets"]
    assert (small["samples"], big["samples"], result["growth"]) == (8, 32, 4.0)
    assert small["samples_made"] == 8 and big["samples_made"] == 32
    assert 0 < small["start_rss_mib"] <= small["peak_rss_mib"] and small["index_cache_entries"] == 2
    assert big["peak_rss_same_work_mib"] <= big["peak_rss_mib"] and big["index_cache_entries"] == 4
    assert result["peak_rss_same_work_ratio"] == big["peak_rss_same_work_mib"] / small["peak_rss_mib"]


def test_floors_of_variants_not_run_are_na_and_only_a_measured_miss_fails_check():
    from selfsup.jobs.bench.pipeline import BenchOptions, summarize

    def extra(per_cpu, **more):
        return {"cores": 1.0, "other_cores": 0.0, "per_cpu_s": per_cpu, **more}

    def result(selfsup_rate, share):
        rates = {"kernel": [100.0], "selfsup": [selfsup_rate]}
        extras = {"kernel": [extra(100.0)], "selfsup": [extra(90.0, stream_kernel_share=share)]}
        return summarize(BenchOptions("image", streams=1, variants="kernel,selfsup"), rates, extras, 64, 64, 8)

    good = result(95.0, 0.95)  # dataloader, Ray Data, torchvision and albumentations were not run
    assert good["floors"]["vs_dataloader"]["pass"] is None and good["floors"]["efficiency"]["pass"] is True
    assert good["pass"] is True
    assert result(50.0, 0.95)["pass"] is False  # efficiency 0.5, under its floor
    assert result(95.0, 0.5)["pass"] is False
