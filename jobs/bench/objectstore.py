"""`selfsup bench pipeline --storage s3`: the selfsup variant reading from S3 against local disk, one run.

The same shards (written once under --workdir) are copied into a bucket of an S3 API served on
127.0.0.1 by moto (selfsup.jobs.bench.s3server, started and stopped here; moto comes with the
test extras). The selfsup variant (ShardStreams + BatchFeed, one epoch) then alternates between
the local copy and the bucket, --repeats rounds, and the figures are medians: samples/s on each,
`s3_vs_local` (issue 22 asks ≥ 0.8), and from inside the streams their ranged reads: how many, the
most in flight at once in one stream (a micro-batch's segment reads run data.read_concurrency at
a time, mix by default), seconds spent reading, and how many overlapped a decode in that stream. moto on loopback has no network latency but
costs CPU on the same machine: the ratio is a floor for the pipeline's own overhead of
object storage, not a forecast for a real bucket. So the server's own CPU is measured too
(`server_cores`), and `s3_vs_local_per_cpu` compares samples per CPU-second of the pipeline alone
(its process tree without the server): what reading from a bucket costs the nodes that read it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any, Iterator

from selfsup.jobs.bench.loopback import free_port, serving
from selfsup.jobs.bench.pipeline import BenchOptions, log

S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def moto_s3() -> Iterator[tuple[str, int]]:
    """An S3 API on 127.0.0.1 (moto, atomic conditional writes) while the block runs; yields its endpoint
    and the server's process id (its CPU is the bucket's, not the pipeline's).

    The AWS settings of this process point at it meanwhile (Ray workers started inside inherit them).
    """
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in (*S3_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        with contextlib.ExitStack() as stack:
            try:
                server = stack.enter_context(serving([sys.executable, "-m", "selfsup.jobs.bench.s3server",
                                                      "127.0.0.1", str(port)], port))
            except TimeoutError:
                raise RuntimeError("the moto S3 server did not start (is moto installed? pip install -e .[test])") from None
            yield endpoint, server.pid
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def upload(local: str, endpoint: str) -> str:
    """Copy a local dataset folder (shards, indexes, manifest) into a fresh bucket; returns its s3:// URL."""
    import boto3  # type: ignore[import-untyped]  # a test extra, as moto is

    from selfsup.pipeline import storage

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
    root = Path(local)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        storage.write_bytes(f"s3://bench/ds/{path.relative_to(root).as_posix()}", path.read_bytes())
    return "s3://bench/ds"


def bench_storage(args: BenchOptions) -> dict[str, Any]:
    """samples/s of the selfsup variant on local disk and on moto S3, alternating; ratio and read figures."""
    from selfsup.jobs.bench import loaders as L
    from selfsup.jobs.bench.pipeline import (SETUPS, SHARDS, modality_args, prepare_shards, run_selfsup,
                                             source_folder)
    from selfsup.pipeline.batch import FeedSpec
    from selfsup.pipeline.snapshot import SourceSpec, build_snapshot

    setup = SETUPS[args.modality]
    size = None if args.modality == "audio" else (args.size or setup.size)
    batch_size, samples = args.batch_size or setup.batch_size, args.samples or setup.samples
    workdir = Path(args.workdir or f"runs/bench/{args.modality}")
    shards = args.streams * -(-SHARDS // args.streams)
    local = prepare_shards(args.modality, source_folder(args.modality, args.data), workdir, samples, shards)
    mod_args = modality_args(args.modality, size, args.recipe)
    with moto_s3() as (endpoint, server):
        specs = {"local": FeedSpec(build_snapshot([SourceSpec(local)], args.modality), batch_size, mod_args),
                 "s3": FeedSpec(build_snapshot([SourceSpec(upload(local, endpoint))], args.modality), batch_size,
                                mod_args)}
        ray_temp = L.start_ray(workdir, args.streams)
        try:
            runs: dict[str, list[dict[str, float]]] = {"local": [], "s3": []}
            for r in range(args.repeats):
                for where, spec in specs.items():
                    clock = L.RunClock()
                    n, extra = run_selfsup(spec, args.streams, args.prefetch, clock)
                    served = clock.per_pid.get(server, 0.0)  # moto's CPU (idle during the local runs)
                    runs[where].append({"samples_per_s": n / clock.wall, **extra, "server_cores": served / clock.wall,
                                        "per_cpu_s": n / max(1e-9, clock.cpu - served)})
                    log(f"[{r + 1}/{args.repeats}] {where:<6} {n / clock.wall:9.1f} samples/s, "
                        f"reads in flight ≤ {extra['reads_in_flight_max']:.0f} a stream")
        finally:
            import ray

            ray.shutdown()
            if ray_temp:
                shutil.rmtree(ray_temp, ignore_errors=True)
    result = summarize_storage(args, runs, batch_size, size)
    log(storage_table(result))
    return result


def summarize_storage(args: BenchOptions, runs: dict[str, list[dict[str, float]]], batch_size: int,
                      size: Any) -> dict[str, Any]:
    """Medians per store and the S3/local ratio."""
    fig = {where: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for where, rs in runs.items()}
    local, s3 = fig["local"]["samples_per_s"], fig["s3"]["samples_per_s"]
    return {"modality": args.modality, "streams": args.streams, "prefetch": args.prefetch, "batch_size": batch_size,
            "size": size, "repeats": args.repeats, "local": fig["local"], "s3": fig["s3"],
            "s3_vs_local": s3 / local if local else None,
            "s3_vs_local_per_cpu": (fig["s3"]["per_cpu_s"] / fig["local"]["per_cpu_s"]
                                    if fig["local"]["per_cpu_s"] else None),
            "reads_overlap_decode": any(r["reads_overlapped_decode"] > 0 for rs in runs.values() for r in rs)}


def storage_table(result: dict[str, Any]) -> str:
    """A readable summary of `bench_storage`'s result."""
    lines = [f"{result['modality']}: selfsup, {result['streams']} streams, batch {result['batch_size']}, "
             f"median of {result['repeats']}",
             f"{'store':<8}{'samples/s':>11}{'reads':>8}{'MB read':>9}{'read s':>8}{'in flight ≤':>13}"
             f"{'during decode':>15}{'ttfb warm s':>13}"]
    for where in ("local", "s3"):
        f = result[where]
        lines.append(f"{where:<8}{f['samples_per_s']:>11.1f}{f['reads']:>8.0f}{f['read_mb']:>9.1f}"
                     f"{f['read_s']:>8.2f}{f['reads_in_flight_max']:>13.0f}{f['reads_overlapped_decode']:>15.0f}{f['ttfb_warm_s']:>13.2f}")
    ratio = result["s3_vs_local"]
    lines.append(f"S3 (moto on 127.0.0.1) / local disk = {'n/a' if ratio is None else f'{ratio:.2f}'} "
                 "(issue 22 asks ≥ 0.8); reads overlap decode: " + ("yes" if result["reads_overlap_decode"] else "no"))
    per_cpu = result.get("s3_vs_local_per_cpu")
    if per_cpu is not None:
        lines.append(f"the moto server itself kept {result['s3']['server_cores']:.2f} of the machine's cores busy "
                     f"during the S3 runs; per CPU-second of the pipeline alone (server excluded), "
                     f"S3 / local = {per_cpu:.2f}")
    return "\n".join(lines)
