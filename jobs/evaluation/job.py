"""The evaluation engine: kNN and linear probes on frozen features of labeled shards.

Every (checkpoint, eval set, target, method, encoder) becomes one row of the run's results
store (jobs/results.py). Baselines (random init of the same architecture and seed; raw
inputs) are computed once per (eval set, target, architecture, seed) and reused. A checkpoint
is marked (`evaluated.json`) after its rows are stored; a restarted `--watch` skips marked
checkpoints and rows already present, so nothing is evaluated twice.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from selfsup.jobs.evaluation import results
from selfsup.jobs.evaluation.report import print_table, write_plots
from selfsup.pipeline import storage
from selfsup.trainers import run_folder, tbevents

log = logging.getLogger(__name__)
METHODS = ("knn", "linear")


@dataclass(frozen=True)
class EvalSet:
    """A labeled set: probe-train and probe-test splits (each a shard location)."""

    name: str
    train_url: str
    test_url: str


@dataclass(frozen=True)
class EvalOptions:
    """How to extract features and what to compute besides the pretrained encoder."""

    workers: int = 2  # feature-extraction actors
    worker_cpus: float = 1.0  # CPUs per actor
    gpus: float = 0.0  # GPUs per actor
    batch_size: int = 256
    no_baselines: bool = False  # skip the random-init and raw-input baselines
    quiet: bool = False  # no progress bars
    use_ray: bool = True  # False: extract features in this process


def run_of(ckpt: str) -> str:
    """`<run>` of `<run>/checkpoints/step-N`."""
    from selfsup.trainers import checkpoint as ck

    parts = ckpt.rstrip("/").rsplit("/", 2)
    if len(parts) < 3 or parts[1] != ck.CHECKPOINTS:
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


class EvalJob:
    """Evaluates checkpoints of one run against eval sets into the results store (jobs/results.py)."""

    def __init__(self, run_dir: str, sets: list[EvalSet], methods: list[str], target: str,
                 opts: Optional[Mapping[str, Any]], options: EvalOptions = EvalOptions()) -> None:
        self.run, self.sets, self.methods, self.target, self.opts = run_dir, sets, methods, target, opts
        self.options = options
        self._snapshots: dict[tuple, Any] = {}

    def watch(self, poll: float) -> int:
        """Evaluate every unevaluated complete checkpoint until the run ends."""
        from selfsup.trainers import checkpoint as ck

        while True:
            state = run_folder.run_state(self.run, self.opts)
            for _, url in ck.list_checkpoints(self.run, self.opts):
                if not set(self.labels()) <= set(marked(url, self.opts)):
                    self.evaluate(url)
            if state in run_folder.ENDED:
                self.finish()
                print(f"selfsup evaluate: run {state}; every checkpoint evaluated", file=sys.stderr)
                return 0
            time.sleep(poll)

    def evaluate(self, ckpt: str) -> None:
        """All eval sets and methods for one checkpoint; then its marker."""
        from selfsup.trainers import checkpoint as ck

        meta = ck.read_meta(ckpt, self.opts)
        done = results.existing_keys(self.run, self.opts)
        for es in self.sets:
            self.evaluate_set(ckpt, meta, es, done)
        done_labels = sorted(set(marked(ckpt, self.opts)) | set(self.labels()))
        storage.write_text(storage.join(ckpt, ck.EVALUATED), json.dumps({"time": time.time(), "done": done_labels}),
                           self.opts)

    def labels(self) -> list[str]:
        """What this job evaluates, as marker entries: eval_set/target/method."""
        return [f"{e.name}/{self.target}/{m}" for e in self.sets for m in self.methods]

    def evaluate_set(self, ckpt: str, meta: Mapping[str, Any], es: EvalSet, done: set) -> None:
        """The rows of one eval set not stored yet: pretrained, and the baselines unless disabled."""
        from selfsup.trainers.probes import knn_accuracy, linear_probe_accuracy

        arch = results.arch_key(meta)
        wanted: dict[str, dict[str, Any]] = {}
        for method in self.methods:
            if (ckpt, es.name, self.target, method, "pretrained") not in done:
                wanted["pretrained"] = {"kind": "pretrained", "checkpoint": ckpt}
            if not self.options.no_baselines:
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
        rows: list[dict[str, Any]] = []
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
        results.append_results(self.run, rows, self.opts)
        if meta.get("config", {}).get("train", {}).get("tensorboard", True):
            try:
                tbevents.write_event_file(self.run, tbevents.eval_scalars(rows, int(meta["step"])), self.opts)
            except OSError as e:  # the rows are stored; the curves are a view of them
                log.warning("could not write TensorBoard scalars to %s (%s)", storage.redact_url(self.run), e)
        for r in rows:
            done.add(results.result_key(r))
            print(f"  {es.name}/{self.target} step {meta['step']} {r['encoder']:<11} {r['method']:<6} "
                  f"{100 * r['accuracy']:.2f}%", file=sys.stderr)

    def features(self, meta: Mapping[str, Any], url: str, split: str, refs: Mapping[str, Any],
                 name: str) -> dict[str, Any]:
        """Features of every wanted encoder, and labels, for one split of an eval set."""
        from tqdm import tqdm

        from selfsup.pipeline.batch import FeedSpec
        from selfsup.pipeline.snapshot import SourceSpec, build_snapshot
        from selfsup.trainers.features import extract

        key = (url, split, meta.get("modality"))
        if key not in self._snapshots:  # --watch evaluates many checkpoints against the same shards
            self._snapshots[key] = build_snapshot([SourceSpec(url, split)], meta.get("modality"), self.opts)
        snap = self._snapshots[key]
        o = self.options
        spec = FeedSpec(snap, o.batch_size, dict(meta.get("modality_args", {})), train=False,
                        label=self.target, storage_options=self.opts)
        bar = tqdm(total=spec.plan(0).num_batches, unit="batch", desc=f"features {name}/{split}",
                   disable=o.quiet, file=sys.stderr)
        with bar:
            out = extract(spec, refs, meta.get("mean"), meta.get("std"), o.workers, use_ray=o.use_ray,
                          num_cpus=o.worker_cpus, num_gpus=o.gpus, progress=bar.update)
        if out["quarantined"]:
            print(f"selfsup evaluate: {out['quarantined']} unreadable sample(s) in {name}/{split} left out",
                  file=sys.stderr)
        return out

    def finish(self) -> None:
        """Plots and the table."""
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
