"""`selfsup bench pipeline`: samples/s of the ShardStream pipeline against common loaders, same data and work.

Variants, all on the same shards of real data (written once under --workdir and reused) with the
modality's train recipe (two views), one OpenCV and one torch thread per process:

- `kernel`: decode + views (`BatchMaker.sample`) in a plain loop in this process. The sample
  bytes are read from the shards before the clock starts, so this is one core's compute ceiling.
- `selfsup`: N ShardStream actors (1 CPU each) + a BatchFeed on a local Ray instance, one epoch.
  The clock starts once the streams are up and warm (one batch each, thrown away): in training
  they live for the whole run.
- `dataloader`: torch DataLoader(num_workers=N) over a webdataset pipeline (shard list → split by
  worker → tar samples) calling the modality's own decode and views.
- `ray_data`: ray.data.read_webdataset (raw bytes) → map_batches(the same code) → iter_batches.
- `best_library`: images: the recipe in albumentations, a plain loop like `kernel` (see
  selfsup.jobs.bench.best_library); vs_best_library = kernel / best_library per CPU-second.
- `torchvision_default`: DataLoader(num_workers=N) with the recipe written the common way on
  tensors (see selfsup.jobs.bench.loaders): image: torchvision decode_image + transforms.v2; audio:
  soundfile + torchaudio, a mel per view and F.interpolate crops; video: PyAV decodes every frame
  of the clip's span at full size (as torchvision.io.read_video), then transforms.v2 on the clip.

Data: image → real JPEG photos, audio → the spoken-digit recordings, video → the videos re-encoded
once to H.264 with short keyframe intervals (what `shards write --reencode` makes). When --samples
exceeds the files, they are linked several times (each copy still gets its own random views).
Ray starts its workers at nice 15; here they run at nice 0, like the DataLoader workers.

Each figure is the median samples/s of --repeats runs, the variants alternating. Ratios:
efficiency = selfsup / (N · kernel); vs_X = selfsup / X. stall_pct is the share of the selfsup
run the consumer spent waiting in BatchFeed.next(); the consumer here does nothing else, so it is
near 100% by construction and what is left is the feed's own per-batch cost in the trainer.
Time to first batch (selfsup, outside the clock): cold from BatchFeed() with fresh actors, warm
from moving a feed whose actors are up and idle to a new position (issue 22 asks ≤ 3 s warm).
On a shared machine the parallel variants get fewer than N cores and `efficiency` drops with no
fault of the pipeline, so each run also records the cores its process tree got (`cores`), the
cores other programs took meanwhile (`other_cores`), and samples per CPU-second of the tree;
cpu_efficiency = selfsup's samples per CPU-second / kernel's, whatever share of the machine
each run got (the Ray and DataLoader processes' own CPU counts against them; the one-process
variants count their own process only, not the idle Ray beside them). Since the machine's speed
drifts between runs, the selfsup run also splits its own CPU within the run: the share of the
streams' CPU spent in decode and views (`stream_kernel_share`, the rest is reads, batch assembly
and Ray's task handling) and the share of the whole spent outside the streams (the consumer and
Ray's own processes: a fixed cost per node). The floors (--check exits 1 below one) are defined
for images.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from selfsup.jobs.data import find_dataset, missing_line

VARIANTS = ("kernel", "best_library", "selfsup", "dataloader", "ray_data", "torchvision_default")
IN_PROCESS = ("kernel", "best_library")  # run in the bench's own process: their CPU is that process's alone


SHARDS = 16  # shards per benchmark dataset (rounded up to a multiple of the streams)


# the floors `selfsup` must clear on images (the acceptance figures of the pipeline)
# vs_best_library: kernel / albumentations per CPU-second (issue 22: >= 1.3; 1.48-1.54 in each of three repeats)
# efficiency was 0.85 against the slower kernel; the kernel became 1.5x faster while the per-sample cost around
# it stayed: medians of 3-5 gave 0.76-0.88 on 2026-12-06 as the machine's speed drifted (docs/performance.md),
# so its floor sits below that spread and stream_kernel_share is the floor that catches per-batch overhead
# stream_kernel_share: the share of the streams' CPU in decode and views, a ratio within each run that the
# machine's drift does not move (0.92 in the image runs of 2026-12-06; 0.93-0.94 since local shards are read
# without a thread pool, that evening; each point below it is per-batch overhead)
FLOORS = {"image": {"efficiency": 0.75, "vs_dataloader": 1.0, "vs_ray_data": 1.5, "vs_torchvision_default": 5.0,
                    "vs_best_library": 1.3, "stream_kernel_share": 0.90}}


@dataclass(frozen=True)
class BenchOptions:
    """What `selfsup bench pipeline` measures (None: the modality's default from SETUPS)."""

    modality: str
    streams: int = 2                 # ShardStreams / DataLoader workers / Ray CPUs
    samples: Optional[int] = None    # samples per epoch
    batch_size: Optional[int] = None
    size: Optional[int] = None       # view side in pixels (not audio)
    recipe: str = "simclr"           # image views: simclr | byol | single (one view)
    repeats: int = 3                 # runs per variant; figures are medians
    prefetch: int = 2                # BatchFeed requests in flight per stream
    variants: str = ",".join(VARIANTS)
    data: Optional[str] = None       # the source folder, or a folder holding it
    workdir: Optional[str] = None    # shards cache and Ray temp dir (default runs/bench/MODALITY)


@dataclass(frozen=True)
class Setup:
    """Per-modality defaults: which dataset, how many samples, batch size and view size."""

    dataset: str
    samples: int
    batch_size: int
    size: Optional[int]


SETUPS = {"image": Setup("photos", 2048, 64, 224), "audio": Setup("fsdd", 4096, 128, None),
          "video": Setup("video", 64, 4, 112)}


def log(msg: str) -> None:
    """Progress and tables go to stderr, so --json leaves stdout clean."""
    print(msg, file=sys.stderr, flush=True)


def stage_sources(files: list[Path], stage: Path, copies: int) -> Path:
    """`stage` holding `copies` sub-folders that link every file (so a source can fill more samples)."""
    for c in range(copies):
        (stage / f"c{c}").mkdir(parents=True, exist_ok=True)
        for f in files:
            link = stage / f"c{c}" / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
    return stage


def reencoded(path: Path, folder: Path) -> Path:
    """`path` as constant-rate H.264 MP4 with short GOPs (what `shards write --reencode` makes), cached."""
    from selfsup.pipeline.modalities.video import reencode_mp4

    out = folder / (path.stem + ".mp4")
    if not out.exists():
        log(f"re-encoding {path.name} (once) ...")
        folder.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".part")
        tmp.write_bytes(reencode_mp4(path.read_bytes()))
        tmp.rename(out)
    return out


def media_files(src: Path, modality: str) -> list[Path]:
    """Media files of `modality` directly in `src`, sorted."""
    from selfsup.pipeline.media import EXTENSIONS

    return sorted(p for p in src.iterdir() if p.suffix.lower().lstrip(".") in EXTENSIONS[modality])


def prepare_shards(modality: str, src: Path, workdir: Path, samples: int, shards: int) -> str:
    """Write (once) `samples` samples of `src` into `shards` equal shards under workdir; returns the URL."""
    from selfsup.jobs.cli import main

    files = media_files(src, modality)
    if not files:
        raise FileNotFoundError(f"{src} holds no {modality} files")
    tag = hashlib.blake2b(str(src.resolve()).encode(), digest_size=4).hexdigest()
    if modality == "video":
        files = [reencoded(f, workdir / "sources" / f"{tag}-mp4") for f in files]
    per_shard = max(1, samples // shards)
    total = per_shard * min(shards, samples)
    copies = math.ceil(total / len(files))
    stage = stage_sources(files, workdir / "sources" / f"{tag}-x{copies}", copies)
    dest = workdir / f"shards-{total}x{per_shard}-{tag}"
    with contextlib.redirect_stdout(sys.stderr):
        code = main(["shards", "write", str(stage), str(dest), "--modality", modality, "--source-type", "folder",
                     "--limit", str(total), "--samples-per-shard", str(per_shard), "--quiet", "--workers", "1"])
    if code:
        raise ValueError(f"writing the benchmark shards into {dest} failed (exit {code})")
    return str(dest)


def source_folder(modality: str, data: Optional[str]) -> Path:
    """The real-data folder for `modality`: --data itself, or the dataset found by selfsup.jobs.data."""
    if data and Path(data).is_dir() and media_files(Path(data), modality):
        return Path(data)
    found = find_dataset(SETUPS[modality].dataset, data)
    if found is None:
        raise FileNotFoundError(missing_line(SETUPS[modality].dataset, data))
    return found


def modality_args(modality: str, size: Optional[int], recipe: str) -> dict[str, Any]:
    """The modality's keyword arguments for the benchmark (its train recipe, two views)."""
    if modality == "image":
        return {"size": size, "recipe": recipe}
    if modality == "video":
        return {"size": size, "output": "two"}
    return {"output": "logmel"}


def read_rows(spec: Any) -> tuple[Any, list[tuple[int, str, dict[str, bytes]]]]:
    """A BatchMaker for `spec` and every sample of its snapshot as (shard, key, members), read into memory:
    what the one-process variants time without I/O (members as bytes, never views of a mapped shard,
    whose pages would be read under the clock)."""
    from selfsup.pipeline.batch import BatchMaker

    maker = BatchMaker(spec)
    maker.member_views = False
    return maker, [(s, key, members) for s, ref in enumerate(spec.snapshot.shards)
                   for key, members in maker.read(s, 0, ref.n_samples)]


def run_kernel(spec: Any, clock: Any) -> tuple[int, dict[str, float]]:
    """decode + views of every sample in this process; bytes are read before the clock starts."""
    maker, rows = read_rows(spec)
    clock.start()
    for slot, (shard, key, members) in enumerate(rows):
        maker.sample(0, shard, key, members, slot)
    clock.stop()
    return len(rows), {}


def run_selfsup(spec: Any, streams: int, prefetch: int, clock: Any) -> tuple[int, dict[str, float]]:
    """One epoch through BatchFeed over `streams` ShardStream actors, and its times to first batch.

    The clock starts once the streams are up and have each made one batch (thrown away): in
    training they live for the whole run, so their start-up is not throughput. Outside the clock:
    `ttfb_cold_s`, from BatchFeed() with fresh actors to its first batch, and `ttfb_warm_s`, from
    moving the feed to a new position (the next epoch) with its actors up to its first batch there.
    """
    import time

    import ray

    from selfsup.jobs.bench.loaders import wait_cpus_free
    from selfsup.pipeline.feed import BatchFeed

    wait_cpus_free(streams)
    t0 = time.perf_counter()
    feed = BatchFeed(spec, streams=streams, prefetch=prefetch, backend="ray", stream_cpus=1.0)
    try:
        feed.next()
        cold = time.perf_counter() - t0
        ray.get([h.batch.remote(0, i % spec.plan(0).num_batches) for i, h in enumerate(feed.stream_handles())])
        feed.load_state_dict({"epoch": 0, "consumed": 0})
        steps, n, waited = feed.steps_per_epoch(), 0, feed.wait_s
        before = ray.get([h.io_stats.remote() for h in feed.stream_handles()])
        clock.start()
        for _ in range(steps):
            n += int(feed.next()["valid"].sum())
        elapsed = clock.stop()
        stall = 100.0 * (feed.wait_s - waited) / elapsed
        after = ray.get([h.io_stats.remote() for h in feed.stream_handles()])  # the asked-ahead requests are made
        pids = ray.get([h.pid.remote() for h in feed.stream_handles()])
        split = cpu_split(before, after, sum(clock.per_pid.get(p, 0.0) for p in pids), clock.cpu)
        t0 = time.perf_counter()
        feed.load_state_dict({"epoch": 1, "consumed": 0})
        feed.next()
        warm = time.perf_counter() - t0
        reads = ray.get([h.io_stats.remote() for h in feed.stream_handles()])  # over the run, warm-ups included
        return n, {"stall_pct": stall, "ttfb_cold_s": cold, "ttfb_warm_s": warm, **split,
                   "reads": sum(r["reads"] for r in reads), "read_mb": sum(r["bytes"] for r in reads) / 1e6,
                   "read_s": sum(r["read_s"] for r in reads),
                   "reads_in_flight_max": max(r["max_in_flight"] for r in reads),
                   "reads_overlapped_decode": sum(r["overlapped_decode"] for r in reads)}
    finally:
        feed.close()


def cpu_split(before: list[dict], after: list[dict], streams_cpu_s: float, tree_cpu_s: float) -> dict[str, float]:
    """Where the selfsup run's CPU went, from the streams' own counters (before/after the timed epoch):
    `stream_kernel_share`, the share of the streams' CPU spent decoding and making views (the kernel's
    work; the rest is reads, batch assembly and Ray's worker), and `outside_streams_share`, the share of
    the whole tree's CPU spent outside the streams (the consumer, the raylet and Ray's other processes).
    Both are ratios within one run, so the machine's drift from run to run does not move them.
    The streams' counters also cover the requests asked ahead at the end (a few batches past the epoch);
    `streams_cpu_s` and `tree_cpu_s` are the streams' and the tree's CPU seconds within the clock."""
    kernel = sum(a["decode_cpu_s"] - b["decode_cpu_s"] for a, b in zip(after, before))
    streams = sum(a["process_cpu_s"] - b["process_cpu_s"] for a, b in zip(after, before))
    return {"stream_kernel_share": kernel / streams if streams > 0 else 0.0,
            "outside_streams_share": max(0.0, 1.0 - streams_cpu_s / tree_cpu_s) if tree_cpu_s > 0 else 0.0}


def variant_runners(args: BenchOptions, spec: Any, paths: list[str]) -> dict[str, Callable[[Any], tuple]]:
    """name → a function making one run timed by the RunClock it is given: (samples, extra figures)."""
    from selfsup.jobs.bench import loaders as L
    from selfsup.jobs.bench.best_library import best_library_runner

    mod_args = dict(spec.modality_args)
    transform = L.ModalityTransform(spec.snapshot.modality, mod_args, spec.seed)
    default = L.default_transform(spec.snapshot.modality, mod_args)
    B, N = spec.batch_size, args.streams

    def ray_data(clock: Any) -> tuple:
        L.wait_cpus_free(N)
        return L.ray_data_run(paths, transform, B, clock), {}

    return {
        "kernel": lambda clock: run_kernel(spec, clock),
        "best_library": best_library_runner(spec, "best_library" in args.variants, log),  # type: ignore[dict-item]
        "selfsup": lambda clock: run_selfsup(spec, N, args.prefetch, clock),
        "dataloader": lambda clock: (L.time_loader(L.wds_loader(paths, transform, B, N), clock), {}),
        "ray_data": ray_data,
        "torchvision_default": (lambda clock: (L.time_loader(L.wds_loader(paths, default, B, N), clock), {}))
        if default else None,  # type: ignore[dict-item]
    }


def summarize(args: BenchOptions, rates: dict[str, list[float]], extras: dict[str, list[dict]],
              samples: int, size: Optional[int], batch_size: int) -> dict[str, Any]:
    """Medians, ratios and floors as one JSON-ready dict."""
    fig = {v: (statistics.median(rates[v]) if rates.get(v) else None) for v in VARIANTS}
    N, s = args.streams, fig["selfsup"]
    out: dict[str, Any] = {"modality": args.modality, "streams": N, "samples": samples, "size": size,
                           "batch_size": batch_size, "repeats": args.repeats, **fig}
    out["efficiency"] = s / (N * fig["kernel"]) if s and fig["kernel"] else None
    for v in ("dataloader", "ray_data", "torchvision_default"):
        x = fig[v]
        out[f"vs_{v}"] = s / x if s and x else None
    stalls = [e["stall_pct"] for e in extras.get("selfsup", []) if "stall_pct" in e]
    out["stall_pct"] = statistics.median(stalls) if stalls else None
    for key in ("ttfb_cold_s", "ttfb_warm_s", "stream_kernel_share", "outside_streams_share"):
        found = [e[key] for e in extras.get("selfsup", []) if key in e]
        out[key] = statistics.median(found) if found else None
    others = [e["other_cores"] for es in extras.values() for e in es]
    out["other_cores"] = statistics.mean(others) if others else None  # cores busy outside the bench
    out["cores"] = {v: round(statistics.median(e["cores"] for e in es), 2) for v, es in extras.items()}
    per_cpu = {v: statistics.median(e["per_cpu_s"] for e in es) for v, es in extras.items()}
    out["samples_per_cpu_s"] = {v: round(x, 1) for v, x in per_cpu.items()}
    out["cpu_efficiency"] = (per_cpu["selfsup"] / per_cpu["kernel"]
                             if per_cpu.get("selfsup") and per_cpu.get("kernel") else None)
    out["vs_best_library"] = (per_cpu["kernel"] / per_cpu["best_library"]  # per core: issue 22 asks >= 1.3
                              if per_cpu.get("kernel") and per_cpu.get("best_library") else None)
    floors = {}
    for key, floor in FLOORS.get(args.modality, {}).items():
        value = out.get(key)
        floors[key] = {"floor": floor, "value": value, "pass": None if value is None else value >= floor}
    out["floors"] = floors
    measured = [f["pass"] for f in floors.values() if f["pass"] is not None]  # variants not run: n/a, not a miss
    out["pass"] = all(measured) if measured else None
    out["runs"] = {v: [round(r, 2) for r in rs] for v, rs in rates.items()}
    out["cpus"] = os.cpu_count()
    if args.modality == "image":
        out["recipe"] = args.recipe
    return out


def table(result: dict[str, Any]) -> str:
    """A readable summary of `summarize`'s result."""
    N = result["streams"]
    label = {"kernel": "kernel (1 process, no I/O)", "best_library": "albumentations (1 process)",
             "selfsup": f"selfsup ({N} streams, Ray)", "dataloader": f"webdataset + DataLoader ({N})",
             "ray_data": f"Ray Data ({N} CPUs)", "torchvision_default": f"torchvision default ({N})"}
    lines = [f"{result['modality']}: {result['samples']} samples, batch {result['batch_size']}"
             + (f", {result['size']} px" if result["size"] else "") + f", median of {result['repeats']}",
             f"{'variant':<32}{'samples/s':>11}{'selfsup ×':>11}{'cores':>7}{'per CPU-s':>11}"]
    for v in VARIANTS:
        x, cores, per_cpu = result[v], result["cores"].get(v), result["samples_per_cpu_s"].get(v)
        ratio = "" if v == "selfsup" or not x or not result["selfsup"] else f"{result['selfsup'] / x:.2f}"
        lines.append(f"{label[v]:<32}{('%.1f' % x) if x else 'n/a':>11}{ratio:>11}"
                     f"{'' if cores is None else '%.2f' % cores:>7}{'' if per_cpu is None else '%.1f' % per_cpu:>11}")
    if result["efficiency"] is not None:
        lines.append(f"efficiency selfsup/(N·kernel) = {result['efficiency']:.2f}; per CPU-second "
                     f"selfsup/kernel = {result['cpu_efficiency']:.2f}")
    if result["vs_best_library"] is not None:
        lines.append(f"vs_best_library kernel/albumentations per CPU-second = {result['vs_best_library']:.2f}")
    if result["other_cores"]:
        lines.append(f"other programs kept {result['other_cores']:.2f} of {result['cpus']} cores busy meanwhile"
                     + (" (figures of parallel variants are low)" if result["other_cores"] > 0.2 else ""))
    if result["stall_pct"] is not None:
        lines.append(f"BatchFeed stall (consumer idle) = {result['stall_pct']:.1f}%")
    if result.get("stream_kernel_share") is not None:
        lines.append(f"selfsup's CPU: {100 * result['stream_kernel_share']:.1f}% of the streams' went to decode and "
                     f"views (the kernel's work), {100 * result['outside_streams_share']:.1f}% of the whole was "
                     "outside the streams (consumer, raylet, Ray's other processes)")
    if result.get("ttfb_cold_s") is not None:
        lines.append(f"time to first batch: cold {result['ttfb_cold_s']:.2f} s (fresh actors), warm "
                     f"{result['ttfb_warm_s']:.2f} s (actors up, new position; issue 22 asks ≤ 3 s)")
    for key, f in result["floors"].items():
        verdict = "n/a" if f["pass"] is None else ("PASS" if f["pass"] else "FAIL")
        value = "n/a" if f["value"] is None else f"{f['value']:.3f}"
        lines.append(f"  {key:<24} {value:>7} ≥ {f['floor']:<5} {verdict}")
    return "\n".join(lines)


def measure(order: list[str], runners: dict[str, Callable[[Any], tuple]], repeats: int
            ) -> tuple[dict[str, list[float]], dict[str, list[dict]]]:
    """Run the variants in turn, `repeats` rounds; samples/s and extra figures per variant and run."""
    from selfsup.jobs.bench.loaders import RunClock

    rates: dict[str, list[float]] = {}
    extras: dict[str, list[dict]] = {}
    for r in range(repeats):
        for i, v in enumerate(order):
            clock = RunClock(tree=v not in IN_PROCESS)
            n, extra = runners[v](clock)
            extra = {**extra, **clock.figures(), "per_cpu_s": n / clock.cpu if clock.cpu else 0.0}
            rates.setdefault(v, []).append(n / clock.wall)
            extras.setdefault(v, []).append(extra)
            log(f"[{r * len(order) + i + 1}/{repeats * len(order)}] {v:<20} {n / clock.wall:9.1f} samples/s "
                f"({n} in {clock.wall:.2f} s)" + "".join(f", {k} {x:.1f}" for k, x in extra.items()))
    return rates, extras


def chosen_variants(text: str) -> list[str]:
    """The --variants list, checked, in the canonical order."""
    wanted = {v.strip() for v in text.split(",") if v.strip()}
    unknown = sorted(wanted - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    return [v for v in VARIANTS if v in wanted]


def bench_pipeline(args: BenchOptions) -> dict[str, Any]:
    """Measure every chosen variant on the same shards; the result dict holds figures, ratios and floors."""
    wanted = chosen_variants(args.variants)
    if args.streams < 1 or args.repeats < 1 or args.prefetch < 1:
        raise ValueError("--streams, --repeats and --prefetch must be at least 1")
    setup = SETUPS[args.modality]
    size = None if args.modality == "audio" else (args.size or setup.size)
    batch_size, samples = args.batch_size or setup.batch_size, args.samples or setup.samples
    if samples < batch_size:
        raise ValueError(f"--samples {samples} must be at least --batch-size {batch_size}")
    workdir = Path(args.workdir or f"runs/bench/{args.modality}")
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    from selfsup.jobs.bench import loaders as L
    from selfsup.pipeline import storage
    from selfsup.pipeline.batch import FeedSpec
    from selfsup.pipeline.snapshot import SourceSpec, build_snapshot

    shards = args.streams * math.ceil(SHARDS / args.streams)
    url = prepare_shards(args.modality, source_folder(args.modality, args.data), workdir, samples, shards)
    snapshot = build_snapshot([SourceSpec(url)], args.modality)
    spec = FeedSpec(snapshot, batch_size, modality_args(args.modality, size, args.recipe))
    paths = [storage.local_path(s.url) for s in snapshot.shards]
    log(f"bench pipeline: {args.modality}, {snapshot.n_samples} samples in {len(paths)} shards, "
        f"{args.streams} streams, {args.repeats} repeats")
    uses_ray = bool({"selfsup", "ray_data"} & set(wanted))
    ray_temp = L.start_ray(workdir, args.streams) if uses_ray else None
    try:
        runners = variant_runners(args, spec, paths)
        rates, extras = measure([v for v in wanted if runners.get(v)], runners, args.repeats)
    finally:
        if uses_ray:
            import ray

            ray.shutdown()
        if ray_temp:
            shutil.rmtree(ray_temp, ignore_errors=True)
    result = summarize(args, rates, extras, snapshot.n_samples, size, batch_size)
    log(table(result))
    return result
