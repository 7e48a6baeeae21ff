"""`selfsup evaluate RUN_OR_CHECKPOINT`: kNN and linear probes on frozen features of labeled shards.

Every (checkpoint, eval set, target, method, encoder) becomes one row of
`<run>/eval/results.parquet`. Baselines (random init of the same architecture and seed; raw
inputs) are computed once per (eval set, target, architecture, seed) and reused. A checkpoint
is marked (`evaluated.json`) after its rows are stored; a restarted `--watch` skips marked
checkpoints and rows already present, so nothing is evaluated twice.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from selfsup.jobs.common import add_storage_args, ensure_ray, storage_options
from selfsup.pipeline import storage

METHODS = ("knn", "linear")
RESULTS = "eval/results.parquet"
COLUMNS = ("checkpoint", "step", "eval_set", "target", "method", "encoder", "accuracy", "n_train", "n_test",
           "seconds", "arch", "time")


@dataclass(frozen=True)
class EvalSet:
    """A labeled set: probe-train and probe-test splits (each a shard location)."""

    name: str
    train_url: str
    test_url: str


def add_parser(sub: Any) -> None:
    """Register `selfsup evaluate`."""
    p = sub.add_parser("evaluate", help="kNN / linear-probe accuracy of checkpoints on labeled shards",
                       description="Evaluate RUN's latest checkpoint (or a given checkpoints/step-N) with frozen "
                                   "features: kNN (k=20, cosine, T=0.07) and a linear probe, beside a random-init "
                                   "encoder and the raw inputs. Results: RUN/eval/results.parquet and plots.")
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT", help="a run folder or one of its checkpoints (path or URL)")
    p.add_argument("--eval-set", action="append", default=[], metavar="NAME=TRAIN_URL[,TEST_URL]",
                   help="labeled shards: the probe-train split of TRAIN_URL and the probe-test split of TEST_URL "
                        "(default TEST_URL = TRAIN_URL); default: every training source holding both splits")
    p.add_argument("--methods", default="knn,linear", help="comma list of knn, linear (default both)")
    p.add_argument("--target", default="cls", help="label to predict: cls, or a key of the samples' .json "
                                                   "(e.g. motion) (default cls)")
    p.add_argument("--watch", action="store_true",
                   help="evaluate each new checkpoint once until the run's status.json says finished or failed")
    p.add_argument("--poll", type=float, default=10.0, help="seconds between checks with --watch (default 10)")
    p.add_argument("--no-baselines", action="store_true", help="skip the random-init and raw baselines")
    p.add_argument("--workers", type=int, default=2, help="feature-extraction actors (default 2)")
    p.add_argument("--worker-cpus", type=float, default=1.0, help="CPUs per extraction actor (default 1)")
    p.add_argument("--gpus", type=float, default=0.0, help="GPUs per extraction actor (default 0)")
    p.add_argument("--batch-size", type=int, default=256, help="eval batch size (default 256)")
    p.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else a local one)")
    p.add_argument("--no-ray", action="store_true", help="extract features in this process")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_storage_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate one checkpoint, or watch a run."""
    from selfsup.trainers import checkpoint as ck

    opts = storage_options(args)
    args.path = storage.full_url(args.path)  # actors run in other folders
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"--methods {args.methods!r}: valid methods are {', '.join(METHODS)}")
    if storage.exists(storage.join(args.path, ck.META), opts):
        run_dir, ckpts = run_of(args.path), [args.path.rstrip("/")]
    else:
        run_dir, ckpts = args.path.rstrip("/"), []
        if not args.watch:
            ckpts = [ck.resolve_checkpoint(run_dir, opts)]
    job = EvalJob(run_dir, parse_eval_sets(args.eval_set, run_dir, opts), methods, args.target, opts, args)
    if not args.no_ray:
        ensure_ray(args.address)
    if args.watch:
        return job.watch(args.poll)
    for c in ckpts:
        job.evaluate(c)
    job.finish()
    return 0


def run_of(ckpt: str) -> str:
    """`<run>` of `<run>/checkpoints/step-N`."""
    parts = ckpt.rstrip("/").rsplit("/", 2)
    if len(parts) < 3 or parts[1] != "checkpoints":
        raise ValueError(f"{storage.redact_url(ckpt)} is not inside a run's checkpoints/ folder")
    return parts[0]


def parse_eval_sets(items: list[str], run_dir: str, opts: Optional[Mapping[str, Any]]) -> list[EvalSet]:
    """--eval-set values, or the run's sources that hold probe-train and probe-test shards."""
    out = []
    for item in items:
        name, sep, urls = item.partition("=")
        if not sep or not name or not urls:
            raise ValueError(f"--eval-set {item!r} must look like NAME=TRAIN_URL[,TEST_URL]")
        train, _, test = urls.partition(",")
        out.append(EvalSet(name, storage.full_url(train), storage.full_url(test or train)))
    if out:
        return out
    from selfsup.pipeline import manifest
    from selfsup.pipeline.snapshot import load_snapshot

    snap = load_snapshot(run_dir, opts)
    roots = sorted({s.url.rsplit("/", 1)[0] for s in snap.shards})
    for root in roots:
        splits = {r["split"] for r in manifest.read_manifest(root, opts)}
        if {"probe-train", "probe-test"} <= splits:
            out.append(EvalSet(root.rstrip("/").rsplit("/", 1)[-1], root, root))
    if not out:
        raise ValueError("no --eval-set given and no training source holds probe-train and probe-test shards; "
                         "write them with `selfsup shards write ... --split probe-train|probe-test`")
    return out


def arch_key(meta: Mapping[str, Any]) -> str:
    """Architecture, its arguments, the seed and the eval view: what a baseline depends on."""
    seed = meta.get("config", {}).get("train", {}).get("seed", 0)
    parts = {"backbone": meta["backbone"], "args": meta.get("backbone_args", {}), "seed": seed,
             "modality": meta.get("modality"), "modality_args": meta.get("modality_args", {})}
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=6).hexdigest()


class EvalJob:
    """Evaluates checkpoints of one run against eval sets; owns results.parquet and the plots."""

    def __init__(self, run_dir: str, sets: list[EvalSet], methods: list[str], target: str,
                 opts: Optional[Mapping[str, Any]], args: argparse.Namespace) -> None:
        self.run, self.sets, self.methods, self.target, self.opts, self.args = run_dir, sets, methods, target, opts, args
        self._snapshots: dict[tuple, Any] = {}

    def watch(self, poll: float) -> int:
        """Evaluate every unevaluated complete checkpoint until the run ends."""
        from selfsup.trainers import checkpoint as ck

        while True:
            state = self.run_state()
            for _, url in ck.list_checkpoints(self.run, self.opts):
                if not set(self.labels()) <= set(marked(url, self.opts)):
                    self.evaluate(url)
            if state in ("finished", "failed", "stopped"):
                self.finish()
                print(f"selfsup evaluate: run {state}; every checkpoint evaluated", file=sys.stderr)
                return 0
            time.sleep(poll)

    def run_state(self) -> str:
        url = storage.join(self.run, "status.json")
        if not storage.exists(url, self.opts):
            return "unknown"
        return json.loads(storage.read_text(url, self.opts)).get("state", "unknown")

    def evaluate(self, ckpt: str) -> None:
        """All eval sets and methods for one checkpoint; then its marker."""
        from selfsup.trainers import checkpoint as ck

        meta = ck.read_meta(ckpt, self.opts)
        done = existing_rows(self.run, self.opts)
        for es in self.sets:
            self.evaluate_set(ckpt, meta, es, done)
        done_labels = sorted(set(marked(ckpt, self.opts)) | set(self.labels()))
        storage.write_text(storage.join(ckpt, ck.EVALUATED), json.dumps({"time": time.time(), "done": done_labels}),
                           self.opts)

    def labels(self) -> list[str]:
        """What this job evaluates, as marker entries: eval_set/target/method."""
        return [f"{e.name}/{self.target}/{m}" for e in self.sets for m in self.methods]

    def evaluate_set(self, ckpt: str, meta: Mapping[str, Any], es: EvalSet, done: set) -> None:
        from selfsup.trainers.probes import knn_accuracy, linear_probe_accuracy

        arch = arch_key(meta)
        wanted: dict[str, dict[str, Any]] = {}
        for method in self.methods:
            if (ckpt, es.name, self.target, method, "pretrained") not in done:
                wanted["pretrained"] = {"kind": "pretrained", "checkpoint": ckpt}
            if not self.args.no_baselines:
                if ("", es.name, self.target, method, "random_init", arch) not in done:
                    wanted["random_init"] = {"kind": "random_init", "spec": meta,
                                             "seed": meta.get("config", {}).get("train", {}).get("seed", 0)}
                if ("", es.name, self.target, method, "raw", arch) not in done:
                    wanted["raw"] = {"kind": "raw"}
        if not wanted:
            return
        t0 = time.perf_counter()
        train = self.features(meta, es.train_url, "probe-train", wanted, es.name)
        test = self.features(meta, es.test_url, "probe-test", wanted, es.name)
        rows = []
        for encoder in wanted:
            for method in self.methods:
                fn = knn_accuracy if method == "knn" else linear_probe_accuracy
                t1 = time.perf_counter()
                acc = fn(*_tensors(train, encoder), *_tensors(test, encoder))
                rows.append({"checkpoint": ckpt if encoder == "pretrained" else "",
                             "step": int(meta["step"]) if encoder == "pretrained" else -1,
                             "eval_set": es.name, "target": self.target, "method": method, "encoder": encoder,
                             "accuracy": float(acc), "n_train": len(train["label"]), "n_test": len(test["label"]),
                             "seconds": round(time.perf_counter() - t1 + (t1 - t0) / len(wanted), 3),
                             "arch": arch, "time": time.time()})
        append_results(self.run, rows, self.opts)
        for r in rows:
            done.add(result_key(r))
            print(f"  {es.name}/{self.target} step {meta['step']} {r['encoder']:<11} {r['method']:<6} "
                  f"{100 * r['accuracy']:.2f}%", file=sys.stderr)

    def features(self, meta: Mapping[str, Any], url: str, split: str, refs: Mapping[str, Any],
                 name: str) -> dict[str, Any]:
        from tqdm import tqdm

        from selfsup.pipeline.batch import FeedSpec
        from selfsup.pipeline.snapshot import SourceSpec, build_snapshot
        from selfsup.trainers.features import extract

        key = (url, split, meta.get("modality"))
        if key not in self._snapshots:  # --watch evaluates many checkpoints against the same shards
            self._snapshots[key] = build_snapshot([SourceSpec(url, split)], meta.get("modality"), self.opts)
        snap = self._snapshots[key]
        spec = FeedSpec(snap, self.args.batch_size, dict(meta.get("modality_args", {})), train=False,
                        label=self.target, storage_options=self.opts)
        bar = tqdm(total=spec.plan(0).num_batches, unit="batch", desc=f"features {name}/{split}",
                   disable=self.args.quiet, file=sys.stderr)
        with bar:
            out = extract(spec, refs, meta.get("mean"), meta.get("std"), self.args.workers,
                          use_ray=not self.args.no_ray, num_cpus=self.args.worker_cpus, num_gpus=self.args.gpus,
                          progress=bar.update)
        if out["quarantined"]:
            print(f"selfsup evaluate: {out['quarantined']} unreadable sample(s) in {name}/{split} left out",
                  file=sys.stderr)
        return out

    def finish(self) -> None:
        """Plots and the table."""
        from selfsup.jobs.report import print_table, write_plots

        paths = write_plots(self.run, self.opts)
        print_table(self.run, self.opts)
        for p in paths:
            print(f"plot: {storage.redact_url(p)}")


def marked(ckpt: str, opts: Optional[Mapping[str, Any]] = None) -> list[str]:
    """The eval_set/target/method entries a checkpoint's marker lists ([] when unmarked)."""
    from selfsup.trainers import checkpoint as ck

    url = storage.join(ckpt, ck.EVALUATED)
    if not storage.exists(url, opts):
        return []
    return list(json.loads(storage.read_text(url, opts)).get("done", []))


def _tensors(part: Mapping[str, Any], encoder: str) -> tuple[Any, Any]:
    import torch

    return torch.from_numpy(part[encoder]).float(), torch.from_numpy(part["label"]).long()


def result_key(row: Mapping[str, Any]) -> tuple:
    """Identity of a result row (baselines by architecture, not checkpoint)."""
    if row["encoder"] == "pretrained":
        return (row["checkpoint"], row["eval_set"], row["target"], row["method"], "pretrained")
    return ("", row["eval_set"], row["target"], row["method"], row["encoder"], row["arch"])


def read_results(run_dir: str, opts: Optional[Mapping[str, Any]] = None) -> Optional[pa.Table]:
    """`<run>/eval/results.parquet`, or None."""
    url = storage.join(run_dir, RESULTS)
    if not storage.exists(url, opts):
        return None
    return pq.read_table(io.BytesIO(storage.read_bytes(url, options=opts)))


def existing_rows(run_dir: str, opts: Optional[Mapping[str, Any]] = None) -> set:
    table = read_results(run_dir, opts)
    return {result_key(r) for r in table.to_pylist()} if table is not None else set()


def append_results(run_dir: str, rows: list[dict[str, Any]], opts: Optional[Mapping[str, Any]] = None) -> None:
    """Append rows to results.parquet (rewritten atomically)."""
    old = read_results(run_dir, opts)
    table = pa.Table.from_pylist(rows)
    if old is not None:
        table = pa.concat_tables([old, table.cast(old.schema)])
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(storage.join(run_dir, RESULTS), buf.getvalue(), opts)
