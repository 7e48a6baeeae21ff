"""`selfsup bench cluster`: samples/s as stream nodes are added under one trainer world.

On this machine it starts its own multi-node Ray cluster (`ray.cluster_utils.Cluster`: each node
its own raylet and object store, on 127.0.0.1): a head with no work resources, one trainer node
(`trainer` resource) holding the trainer world (--ranks consumer actors, each a BatchFeed as a
Ray Train worker has), and stream nodes (`stream` resource, --node-cpus CPUs, --streams-per-node
ShardStreams each) added one at a time up to --nodes. For each node count the world reads one
epoch of the same shards (the image train recipe, two views), and the figures are:

- `samples_per_s`: samples the world received per second (the clock starts once every stream
  has made one batch);
- `samples_per_cpu_s`: samples per CPU-second spent by the stream nodes' processes (raylet and
  ShardStream workers, from /proc): the figure that transfers to another machine, since it does
  not depend on how many cores the nodes got;
- `per_node`: each stream node's CPU-seconds and cores used, and `scaling`: samples/s against one
  node.

On a machine with fewer cores than the nodes ask for, samples/s stops growing when the
cores run out while samples per CPU-second stays: read the first as this machine's and the second
as the stream nodes'. The world receives every planned sample of the epoch exactly once at each
node count (checked: the run fails otherwise).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


@dataclass(frozen=True)
class ClusterBenchOptions:
    """What `selfsup bench cluster` measures."""

    nodes: int = 3               # stream nodes, added one at a time (1, 2, ..., nodes)
    node_cpus: float = 1.0       # CPUs each stream node offers
    streams_per_node: int = 2    # ShardStreams on each stream node (each asks node_cpus / streams_per_node)
    ranks: int = 2               # the trainer world: consumer ranks on the trainer node
    samples: int = 1024
    batch_size: int = 32
    size: int = 224
    prefetch: int = 2
    repeats: int = 1
    data: Optional[str] = None
    workdir: Optional[str] = None


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check(opts: ClusterBenchOptions) -> None:
    """ValueError naming the option that cannot work."""
    if opts.nodes < 1 or opts.streams_per_node < 1 or opts.ranks < 1 or opts.repeats < 1 or opts.prefetch < 1:
        raise ValueError("--nodes, --streams-per-node, --ranks, --repeats and --prefetch must be at least 1")
    if opts.node_cpus <= 0:
        raise ValueError(f"--node-cpus {opts.node_cpus} must be positive")
    if opts.streams_per_node % opts.ranks and opts.ranks % opts.streams_per_node:
        raise ValueError(f"--streams-per-node {opts.streams_per_node} and --ranks {opts.ranks}: one must divide "
                         "the other, so that every rank gets the same number of streams at every node count")
    if opts.samples < opts.batch_size * opts.ranks:
        raise ValueError(f"--samples {opts.samples} must be at least --batch-size × --ranks "
                         f"({opts.batch_size * opts.ranks})")


class World:
    """The consumer ranks: actors on the trainer node, each reading its share of an epoch."""

    def __init__(self, spec: Any, opts: ClusterBenchOptions, nodes: int) -> None:
        import ray

        from selfsup.jobs.bench.consumer import Rank

        self.streams = max(1, nodes * opts.streams_per_node // opts.ranks)
        cpus = opts.node_cpus / opts.streams_per_node
        actor: Any = ray.remote(num_cpus=0, resources={"trainer": 1})(Rank)
        self.ranks: list[Any] = [actor.remote(spec, r, opts.ranks, self.streams, opts.prefetch, cpus)
                                 for r in range(opts.ranks)]
        ray.get([r.warm.remote() for r in self.ranks])

    def epoch(self) -> list[dict[str, Any]]:
        import ray

        return ray.get([r.epoch.remote() for r in self.ranks])

    def stream_nodes(self) -> list[str]:
        import ray

        return [n for r in self.ranks for n in ray.get(r.stream_nodes.remote())]

    def close(self) -> None:
        import ray

        ray.get([r.close.remote() for r in self.ranks])
        for r in self.ranks:
            ray.kill(r)


def node_cpu(nodes: list[Any]) -> tuple[float, float, dict[str, float]]:
    """(seconds the machine has been busy, CPU seconds of this process tree — the driver, every node
    and worker —, {node id: CPU seconds of its raylet's process tree}) so far."""
    from selfsup.jobs.bench.loaders import proc_table, process_tree

    busy, children, seconds = proc_table()
    out = {}
    for node in nodes:
        raylet = node.all_processes["raylet"][0].process.pid
        out[node.node_id] = sum(process_tree(raylet, children, seconds).values())
    return busy, sum(process_tree(os.getpid(), children, seconds).values()), out


def measure(stream_nodes: list[Any], spec: Any, opts: ClusterBenchOptions) -> dict[str, Any]:
    """Every repeat of one epoch at the current node count; the median run's figures."""
    plan = spec.plan(0)
    urls = [s.url for s in spec.snapshot.shards]
    planned = sorted((urls[s], p) for i in range(plan.steps(opts.ranks) * opts.ranks)
                     for s, lo, hi in plan.batch(i) for p in range(lo, hi))
    world = World(spec, opts, len(stream_nodes))
    try:
        placed = world.stream_nodes()
        runs = []
        for _ in range(opts.repeats):
            (busy0, ours0, cpu0), t0 = node_cpu(stream_nodes), time.perf_counter()
            results = world.epoch()
            wall = time.perf_counter() - t0
            busy1, ours1, cpu1 = node_cpu(stream_nodes)
            got = sorted(tuple(k) for r in results for k in r["keys"])
            if got != planned:
                raise RuntimeError(f"the world received {len(got)} samples, {len(set(got))} distinct, "
                                   f"not the epoch's {len(planned)} once each")
            used = {n: cpu1[n] - cpu0[n] for n in cpu1}
            runs.append({"wall": wall, "samples": len(got), "cpu": used,
                         "wait_s": max(r["wait_s"] for r in results),
                         "other_cores": max(0.0, (busy1 - busy0) - (ours1 - ours0)) / wall})
    finally:
        world.close()
    run = sorted(runs, key=lambda r: r["wall"])[len(runs) // 2]
    total_cpu = sum(run["cpu"].values())
    return {
        "nodes": len(stream_nodes), "streams": world.streams * opts.ranks,
        "streams_per_node": {n[:8]: placed.count(n) for n in sorted(set(placed))},
        "samples": run["samples"], "seconds": round(run["wall"], 3),
        "samples_per_s": round(run["samples"] / run["wall"], 1),
        "samples_per_cpu_s": round(run["samples"] / total_cpu, 1) if total_cpu else None,
        "stall_pct": round(100.0 * run["wait_s"] / run["wall"], 1),
        "other_cores": round(run["other_cores"], 2),  # cores other programs kept busy meanwhile
        "per_node": {n[:8]: {"cpu_s": round(c, 2), "cores": round(c / run["wall"], 2)} for n, c in run["cpu"].items()},
        "runs_s": [round(r["wall"], 3) for r in runs],
    }


def table(result: dict[str, Any]) -> str:
    """The rows of `bench_cluster`'s result, one per node count."""
    o = result["options"]
    lines = [f"bench cluster: {result['samples']} samples, batch {o['batch_size']}, {o['size']} px, "
             f"{o['ranks']} ranks on one trainer node; each stream node {o['node_cpus']} CPU, "
             f"{o['streams_per_node']} streams",
             f"{'stream nodes':>12}{'streams':>9}{'samples/s':>11}{'scaling':>9}{'per CPU-s':>11}"
             f"{'stall %':>9}{'others':>8}  cores per node"]
    for row in result["rows"]:
        cores = " ".join(f"{v['cores']:.2f}" for v in row["per_node"].values())
        lines.append(f"{row['nodes']:>12}{row['streams']:>9}{row['samples_per_s']:>11.1f}{row['scaling']:>9.2f}"
                     f"{row['samples_per_cpu_s'] or 0:>11.1f}{row['stall_pct']:>9.1f}{row['other_cores']:>8.2f}  {cores}")
    lines.append(f"this machine: {os.cpu_count()} cores, of which `others` were kept busy by other programs; "
                 "samples/s stops growing once the nodes ask for more cores than are free, samples per "
                 "CPU-second is the stream nodes' own rate")
    return "\n".join(lines)


def bench_cluster(opts: ClusterBenchOptions) -> dict[str, Any]:
    """Start the cluster, add stream nodes one by one, measure each count; the result as a dict."""
    check(opts)
    import cv2

    from selfsup.jobs.bench.pipeline import modality_args, prepare_shards, source_folder
    from selfsup.pipeline.batch import FeedSpec
    from selfsup.pipeline.snapshot import SourceSpec, build_snapshot

    cv2.setNumThreads(1)
    workdir = Path(opts.workdir or "runs/bench/cluster")
    shards = max(opts.nodes * opts.streams_per_node, 8)
    url = prepare_shards("image", source_folder("image", opts.data), workdir, opts.samples, shards)
    snapshot = build_snapshot([SourceSpec(url)], "image")
    spec = FeedSpec(snapshot, opts.batch_size, modality_args("image", opts.size, "simclr"))
    log(f"bench cluster: {snapshot.n_samples} samples in {len(snapshot.shards)} shards, up to {opts.nodes} "
        f"stream node(s)")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every node on 127.0.0.1
    os.environ.setdefault("RAY_worker_niceness", "0")  # as bench pipeline: streams at the consumers' weight
    import ray
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="selfsup-bc-")  # short: Ray's socket paths live under it
    node: dict[str, Any] = {"node_ip_address": "127.0.0.1", "include_dashboard": False, "temp_dir": temp}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, **node})
    rows: list[dict[str, Any]] = []
    try:
        cluster.add_node(num_cpus=0, resources={"trainer": float(opts.ranks)}, **node)
        stream_nodes = []
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        for k in range(1, opts.nodes + 1):
            stream_nodes.append(cluster.add_node(num_cpus=opts.node_cpus,
                                                 resources={"stream": float(opts.streams_per_node)}, **node))
            cluster.wait_for_nodes()
            row = measure(stream_nodes, spec, opts)
            row["scaling"] = round(row["samples_per_s"] / rows[0]["samples_per_s"], 2) if rows else 1.0
            rows.append(row)
            log(f"{k} stream node(s): {row['samples_per_s']:.1f} samples/s, {row['samples_per_cpu_s']} per CPU-s, "
                f"stall {row['stall_pct']:.1f}%")
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    per_cpu = [r["samples_per_cpu_s"] for r in rows if r["samples_per_cpu_s"]]
    result = {"samples": snapshot.n_samples, "rows": rows, "options": dataclasses.asdict(opts),
              "samples_per_cpu_s_median": statistics.median(per_cpu) if per_cpu else None, "cpus": os.cpu_count()}
    log(table(result))
    return result
