"""`selfsup bench pipeline|cluster|train|methods`: parse the flags, run the benchmark engine (selfsup.jobs.bench), print."""
from __future__ import annotations

import argparse
import json
from typing import Any

from selfsup.jobs.bench import pipeline as engine
from selfsup.jobs.bench.pipeline import SETUPS, VARIANTS, BenchOptions, bench_pipeline


def add_parser(sub: Any) -> None:
    """Register `selfsup bench pipeline`, `cluster`, `train` and `methods`."""
    p = sub.add_parser("bench", help="measure the data pipeline against common loaders, and a recipe's training step",
                       description="Benchmarks; they print ratios, which travel between machines.")
    bsub = p.add_subparsers(dest="bench_command", metavar="ACTION", required=True)
    b = bsub.add_parser(
        "pipeline", help="samples/s of ShardStreams vs DataLoader, Ray Data and torchvision defaults",
        description=(engine.__doc__ or "").split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--modality", required=True, choices=sorted(SETUPS))
    b.add_argument("--streams", type=int, default=2, help="streams / DataLoader workers / Ray CPUs (default 2)")
    b.add_argument("--samples", type=int, help="samples per epoch (default: image 2048, audio 4096, video 64; "
                                               "the source files are repeated when there are fewer)")
    b.add_argument("--batch-size", type=int, help="default: image 64, audio 128, video 4")
    b.add_argument("--size", type=int, help="view side in pixels (default: image 224, video 112; not audio)")
    b.add_argument("--recipe", choices=["simclr", "byol", "single"], default="simclr",
                   help="image views (default simclr); single: one view, as MAE reads it (its mask not "
                        "included), with --variants kernel,selfsup")
    b.add_argument("--repeats", type=int, default=3, help="runs per variant; figures are medians (default 3)")
    b.add_argument("--prefetch", type=int, default=2, help="BatchFeed requests in flight per stream (default 2)")
    b.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    b.add_argument("--data", help="the source folder itself, or a folder holding it "
                                  "(default: $SELFSUP_DATA, /usr/share/datasets, ../shared/datasets)")
    b.add_argument("--workdir", help="shards cache and Ray temp dir (default runs/bench/MODALITY)")
    b.add_argument("--json", action="store_true", help="print one JSON object on stdout (table goes to stderr)")
    b.add_argument("--check", action="store_true", help="exit 1 when a floor is missed")
    b.add_argument("--storage", choices=["local", "s3"], default="local",
                   help="s3: instead, the selfsup variant on local disk vs. the same shards on a moto S3 server on "
                        "127.0.0.1 that the bench starts (needs the test extras), alternating; ratio and ranged "
                        "reads in flight per stream")
    b.add_argument("--grow", action="store_true",
                   help="instead: one stream's peak RSS over an epoch of a dataset and of one 10× larger "
                        "(2× shards, 5× samples a shard); --batch-size (32), --size (64), --data, --workdir apply")
    b.add_argument("--index-cache-mb", type=float, default=64.0,
                   help="with --grow: the streams' shard-index cache budget (default 64)")
    b.set_defaults(run=run)

    from selfsup.jobs.bench import cluster as cluster_engine

    c = bsub.add_parser(
        "cluster", help="samples/s and samples per CPU-second as stream nodes are added (1, 2, 3) under one "
                        "trainer world, on a multi-node Ray cluster it starts on this machine",
        description=(cluster_engine.__doc__ or "").split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    d = cluster_engine.ClusterBenchOptions()
    c.add_argument("--nodes", type=int, default=d.nodes, help=f"stream nodes, added one at a time (default {d.nodes})")
    c.add_argument("--node-cpus", type=float, default=d.node_cpus,
                   help=f"CPUs each stream node offers (default {d.node_cpus:g})")
    c.add_argument("--streams-per-node", type=int, default=d.streams_per_node,
                   help=f"ShardStreams on each stream node (default {d.streams_per_node})")
    c.add_argument("--ranks", type=int, default=d.ranks, help=f"consumer ranks of the trainer world (default {d.ranks})")
    c.add_argument("--samples", type=int, default=d.samples, help=f"samples per epoch (default {d.samples})")
    c.add_argument("--batch-size", type=int, default=d.batch_size, help=f"micro-batch size (default {d.batch_size})")
    c.add_argument("--size", type=int, default=d.size, help=f"view side in pixels (default {d.size})")
    c.add_argument("--prefetch", type=int, default=d.prefetch, help=f"requests in flight per stream (default {d.prefetch})")
    c.add_argument("--repeats", type=int, default=d.repeats, help=f"epochs per node count; the median is kept "
                                                                  f"(default {d.repeats})")
    c.add_argument("--data", help="the photos folder, or a folder holding it "
                                  "(default: $SELFSUP_DATA, /usr/share/datasets, ../shared/datasets)")
    c.add_argument("--workdir", help="shards cache (default runs/bench/cluster)")
    c.add_argument("--json", action="store_true", help="print one JSON object on stdout (table goes to stderr)")
    c.set_defaults(run=run_cluster)
    add_train_parser(bsub)
    add_methods_parser(bsub)


def add_train_parser(bsub: Any) -> None:
    """Register `selfsup bench train`."""
    from selfsup.jobs.bench import train as train_engine

    d = train_engine.TrainBenchOptions(config="")
    t = bsub.add_parser(
        "train", help="a recipe's step fed by the pipeline vs. fed by batches already on the device; stall, "
                      "samples per CPU-second and the CPU cores an accelerator needs",
        description=(train_engine.__doc__ or "").split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("config", metavar="CONFIG", help="YAML config (e.g. jobs/configs/gpu/mae_vit_b16.yaml)")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. data.batch_size=64")
    t.add_argument("--steps", type=int, default=d.steps, help=f"timed steps per variant (default {d.steps})")
    t.add_argument("--seconds", type=float, help="instead of --steps: seconds for the whole bench, shared by "
                                                 "the variants (fed 1/2, synthetic 1/4, pipeline 1/4)")
    t.add_argument("--warmup", type=int, default=d.warmup, help=f"untimed steps first (default {d.warmup})")
    t.add_argument("--backend", choices=["ray", "local"], default=d.backend,
                   help=f"where the streams run: Ray actors or local processes (default {d.backend}; no Ray)")
    t.add_argument("--data", help="shard location to read instead of the config's data.sources")
    t.add_argument("--json", action="store_true", help="print one JSON object on stdout (table goes to stderr)")
    t.set_defaults(run=run_train)


def add_methods_parser(bsub: Any) -> None:
    """Register `selfsup bench methods`."""
    from selfsup.jobs.bench import methods as methods_engine
    from selfsup.jobs.demo_plans import PLANS

    d = methods_engine.MethodsBenchOptions()
    m = bsub.add_parser(
        "methods", help="every objective × modality under the same training time, evaluated alike: "
                        "the table of docs/methods.md (hours: cells × (budget + evaluation))",
        description=(methods_engine.__doc__ or "").split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("--modality", action="append", choices=sorted(PLANS),
                   help="modality to run (repeatable; default all)")
    m.add_argument("--methods", default="", help="comma-separated methods (default: every jobs/configs/"
                                                 "<method>_<modality>.yaml of the modalities)")
    m.add_argument("--budget-minutes", type=float, default=d.budget_minutes,
                   help=f"training wall time per cell, the LR schedule fitted to it (default {d.budget_minutes:g})")
    m.add_argument("--budgets", default="", help="comma-separated extra budgets in minutes (e.g. 1,2,5) for the "
                                                 "best three per modality: the accuracy-vs-budget plot; costs "
                                                 "3 × modalities × budgets more cells")
    m.add_argument("--workdir", default=d.workdir, help=f"data, runs and cell records (local; default {d.workdir})")
    m.add_argument("--rerun", action="append", default=[], metavar="METHOD/MODALITY[@MINUTES]",
                   help="forget and run this cell again, e.g. simclr/image (repeatable)")
    m.add_argument("--retry-failed", action="store_true", help="run the cells recorded as failed again")
    m.add_argument("--out", default=d.out, help=f"the doc to write (default {d.out}; the plot beside it)")
    m.add_argument("--data", help="folder holding the datasets (default: $SELFSUP_DATA, /usr/share/datasets, "
                                  "../shared/datasets)")
    m.add_argument("--no-ray", action="store_true", help="train and extract features in this process (one "
                                                         "worker): figures not comparable with the default's")
    m.add_argument("--json", action="store_true", help="print the cell records as one JSON object on stdout")
    m.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides for every cell (changes the "
                                                                     "comparison: say so beside the table)")
    m.set_defaults(run=run_methods)


def run_methods(args: argparse.Namespace) -> int:
    """Run the missing cells, write the doc; with --json, the records on stdout."""
    import shlex
    import sys

    from selfsup.jobs.bench.methods import MethodsBenchOptions, bench_methods

    def floats(text: str) -> tuple[float, ...]:
        """`1,2,5` → (1.0, 2.0, 5.0)."""
        try:
            return tuple(float(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise ValueError(f"--budgets {text!r} must be comma-separated minutes, e.g. 1,2,5") from None

    result = bench_methods(MethodsBenchOptions(
        modalities=tuple(args.modality or ()), methods=tuple(x.strip() for x in args.methods.split(",") if x.strip()),
        budget_minutes=args.budget_minutes, workdir=args.workdir, rerun=tuple(args.rerun),
        retry_failed=args.retry_failed, out=args.out, data=args.data, budgets=floats(args.budgets),
        use_ray=not args.no_ray, overrides=tuple(args.overrides),
        command=shlex.join(["selfsup", *sys.argv[sys.argv.index("bench"):]]) if "bench" in sys.argv
        else "selfsup bench methods"))
    return emit(result, args.json)


def run_train(args: argparse.Namespace) -> int:
    """Measure the recipe's step fed and at its ceiling, print the table (stderr) and, with --json, the result."""
    from selfsup.jobs.bench.train import TrainBenchOptions, bench_train

    result = bench_train(TrainBenchOptions(config=args.config, overrides=tuple(args.overrides), steps=args.steps,
                                           seconds=args.seconds, warmup=args.warmup, backend=args.backend,
                                           data=args.data))
    return emit(result, args.json)


def run_cluster(args: argparse.Namespace) -> int:
    """Measure 1..--nodes stream nodes, print the table (stderr) and, with --json, the result (stdout)."""
    from selfsup.jobs.bench.cluster import ClusterBenchOptions, bench_cluster

    result = bench_cluster(ClusterBenchOptions(
        nodes=args.nodes, node_cpus=args.node_cpus, streams_per_node=args.streams_per_node, ranks=args.ranks,
        samples=args.samples, batch_size=args.batch_size, size=args.size, prefetch=args.prefetch,
        repeats=args.repeats, data=args.data, workdir=args.workdir))
    return emit(result, args.json)


def emit(result: dict[str, Any], as_json: bool) -> int:
    """With --json, the result as one JSON object on stdout (the table went to stderr); exit 0."""
    if as_json:
        print(json.dumps(result, indent=2))
    return 0


def run(args: argparse.Namespace) -> int:
    """Measure, print the table (stderr) and, with --json, the result (stdout); --check: exit 1 below a floor."""
    if args.grow:
        return run_growth(args)
    if args.storage == "s3":
        from selfsup.jobs.bench.objectstore import bench_storage

        return emit(bench_storage(BenchOptions(
            modality=args.modality, streams=args.streams, samples=args.samples, batch_size=args.batch_size,
            size=args.size, recipe=args.recipe, repeats=args.repeats, prefetch=args.prefetch, data=args.data,
            workdir=args.workdir)), args.json)
    result = bench_pipeline(BenchOptions(
        modality=args.modality, streams=args.streams, samples=args.samples, batch_size=args.batch_size,
        size=args.size, recipe=args.recipe, repeats=args.repeats, prefetch=args.prefetch, variants=args.variants,
        data=args.data, workdir=args.workdir))
    emit(result, args.json)
    return 1 if args.check and result["pass"] is False else 0


def run_growth(args: argparse.Namespace) -> int:
    """`bench pipeline --grow`: a stream's peak RSS as the dataset grows 10×; table (stderr), --json (stdout)."""
    from selfsup.jobs.bench.growth import GrowthOptions, bench_growth

    d = GrowthOptions()
    result = bench_growth(GrowthOptions(
        modality=args.modality, batch_size=args.batch_size or d.batch_size, size=args.size or d.size,
        index_cache_mb=args.index_cache_mb, data=args.data, workdir=args.workdir))
    return emit(result, args.json)
