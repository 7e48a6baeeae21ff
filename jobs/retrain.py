"""`selfsup retrain CONFIG [--as-of TIME] [--min-new-samples N]`: idempotent scheduled retraining.

One invocation, under a lease in storage (`<runs>/retrain.lease`, conditional writes):

1. new data = shards visible in the manifest as of TIME that are not in the snapshot of the last
   *attempted* retrain run (promoted or not), so rejected data is not retrained on every tick;
2. with at least N new samples, a run `<runs>/<as-of>-<manifest digest>` trains on the whole
   manifest as of TIME for `retrain.steps`, warm-started from the promoted checkpoint (weights
   only: fresh optimizer and LR schedule; the first run starts from scratch);
3. its last checkpoint is evaluated on `retrain.eval_set` (kNN or linear probe) and promoted
   (`<runs>/promoted.json`, replaced with a conditional write) only if it is not worse than the
   promoted model by more than `retrain.tolerance`; the first must beat a random-init encoder.

A second invocation while the lease is live does nothing; one that finds it expired (the holder
died) resumes the same run from its newest checkpoint. A run that stops early (train.time_limit_minutes)
is handed over the same way. Every decision is one line of `<runs>/retrain-log.jsonl`.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sys
import time
from typing import Any, Optional

from selfsup.pipeline import lease as leases
from selfsup.pipeline import storage
from selfsup.pipeline.config import load_config

LEASE, LOG, PROMOTED = "retrain.lease", "retrain-log.jsonl", "promoted.json"
ATTEMPTS = ("start", "resume")


def add_parser(sub: Any) -> None:
    """Register `selfsup retrain`."""
    p = sub.add_parser("retrain", help="scheduled retraining: train on new shards, evaluate, promote or reject",
                       description="Idempotent retraining for a schedule (cron): when enough new samples arrived "
                                   "since the last attempted run, pretrain a new run warm-started from the promoted "
                                   "checkpoint, evaluate it and promote it if it is not worse. The `retrain` section "
                                   "of CONFIG holds runs, eval_set, metric, target, tolerance, min_new_samples, "
                                   "lease_seconds and steps.",
                       epilog="Decisions: RUNS/retrain-log.jsonl; the promoted model: RUNS/promoted.json.")
    p.add_argument("config", metavar="CONFIG", help="YAML config (path or URL)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. retrain.tolerance=0.01")
    p.add_argument("--as-of", metavar="TIME", help="use the manifest as it was at TIME (ISO 8601, UTC unless "
                                                   "it names a zone; default now)")
    p.add_argument("--min-new-samples", type=int, metavar="N",
                   help="train only when at least N new samples arrived (default retrain.min_new_samples)")
    p.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else a local one)")
    p.add_argument("--no-ray", action="store_true", help="train and evaluate in this process, without Ray")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Take the lease, decide, and (maybe) train, evaluate and promote."""
    from selfsup.trainers.config import PretrainConfig, validate

    cfg = check(validate(load_config(PretrainConfig, args.config, args.overrides)))
    root = storage.full_url(cfg.retrain.runs or cfg.run)
    opts = cfg.storage_options
    leases.check_supported(root)
    as_of = parse_as_of(args.as_of)
    min_new = cfg.retrain.min_new_samples if args.min_new_samples is None else args.min_new_samples
    storage.makedirs(root, opts)
    lease = leases.Lease(storage.join(root, LEASE), cfg.retrain.lease_seconds, opts)
    book = RetrainLog(root, lease.owner, opts)
    taken = lease.acquire()
    if taken is None:
        holder = lease.holder() or {}
        book.append("busy", reason="another retrain holds the lease; nothing started", holder=holder.get("owner"),
                    holder_run=holder.get("run"), lease_expires=_iso(holder.get("expires")))
        return 0
    try:
        with lease.renewing():
            job = Retrain(cfg, root, lease, book, args)
            return job.resume(taken.previous) if taken.previous.get("run") else job.maybe_start(as_of, min_new)
    except Exception as e:  # noqa: BLE001 - record any failure, then report it like other commands
        error = storage.redact(f"{type(e).__name__}: {e}")[:2000]
        book.append("failed", run=lease.fields.get("run"), reason=error)
        if isinstance(e, (ValueError, FileNotFoundError, PermissionError)):
            raise
        print(f"selfsup retrain: failed: {error}", file=sys.stderr)
        return 1
    finally:
        lease.release()


def check(cfg: Any) -> Any:
    """Retrain settings that types alone cannot check."""
    from selfsup.jobs.evaluate import METHODS

    r = cfg.retrain
    if r.metric not in METHODS:
        raise ValueError(f"retrain.metric={r.metric!r}; valid: {', '.join(METHODS)}")
    if r.min_new_samples < 0:
        raise ValueError(f"retrain.min_new_samples={r.min_new_samples} must not be negative")
    if r.lease_seconds <= 0:
        raise ValueError(f"retrain.lease_seconds={r.lease_seconds} must be positive")
    if r.steps is not None and r.steps < 1:
        raise ValueError(f"retrain.steps={r.steps} must be at least 1")
    return cfg


def parse_as_of(text: Optional[str]) -> dt.datetime:
    """ISO 8601 → an aware UTC datetime (naive times are UTC); None → now."""
    if not text or text == "now":
        return dt.datetime.now(dt.timezone.utc)
    try:
        t = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--as-of {text!r} is not an ISO 8601 time (e.g. 2025-01-31T03:00:00Z)") from None
    return (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).astimezone(dt.timezone.utc)


def _iso(t: Any) -> Optional[str]:
    if t is None:
        return None
    if isinstance(t, dt.datetime):
        return t.isoformat()
    return dt.datetime.fromtimestamp(float(t), dt.timezone.utc).isoformat(timespec="seconds")


class RetrainLog:
    """`<runs>/retrain-log.jsonl`: one JSON line per decision, echoed to stderr."""

    def __init__(self, root: str, owner: str, opts: Any) -> None:
        self.url, self.owner, self.opts = storage.join(root, LOG), owner, opts

    def append(self, decision: str, **fields: Any) -> dict[str, Any]:
        entry = {"time": _iso(time.time()), "decision": decision, "owner": self.owner,
                 **{k: v for k, v in fields.items() if v is not None}}
        storage.append_line(self.url, json.dumps(entry, default=str), self.opts)
        detail = entry.get("reason") or entry.get("run") or ""
        print(f"selfsup retrain: {decision}: {detail}", file=sys.stderr)
        return entry

    def entries(self) -> list[dict[str, Any]]:
        if not storage.exists(self.url, self.opts):
            return []
        return [json.loads(x) for x in storage.read_text(self.url, self.opts).splitlines() if x.strip()]


def last_attempt(entries: list[dict[str, Any]]) -> Optional[str]:
    """The run of the newest start/resume entry."""
    runs = [e["run"] for e in entries if e.get("decision") in ATTEMPTS and e.get("run")]
    return runs[-1] if runs else None


def new_shards(snap: Any, previous: Any) -> list[Any]:
    """Shards of `snap` that `previous` (a snapshot or None) does not hold, by URL and content hash."""
    seen = {(s.url, s.sha256) for s in previous.shards} if previous is not None else set()
    return [s for s in snap.shards if (s.url, s.sha256) not in seen]


class Retrain:
    """One invocation holding the lease."""

    def __init__(self, cfg: Any, root: str, lease: leases.Lease, book: RetrainLog, args: argparse.Namespace) -> None:
        self.cfg, self.root, self.lease, self.book, self.args = cfg, root, lease, book, args
        self.opts = cfg.storage_options

    def maybe_start(self, as_of: dt.datetime, min_new: int) -> int:
        """Compare the manifest with the last attempt's snapshot; start a run when enough is new."""
        from selfsup.pipeline.snapshot import SourceSpec, build_snapshot, load_snapshot, save_snapshot

        last = last_attempt(self.book.entries())
        sources = [SourceSpec(s.url, s.split, s.weight, s.name) for s in self.cfg.data.sources]
        snap = build_snapshot(sources, self.cfg.data.modality, self.opts, as_of=as_of)
        previous = None
        if last and storage.exists(storage.join(self.root, last, "manifest.parquet"), self.opts):
            previous = load_snapshot(storage.join(self.root, last), self.opts)
        elif last:
            print(f"selfsup retrain: warning: the last attempted run {last} has no manifest.parquet any more; "
                  "every visible shard counts as new", file=sys.stderr)
        new = new_shards(snap, previous)
        n_new = sum(s.n_samples for s in new)
        facts = {"as_of": _iso(as_of), "last_run": last, "new_shards": len(new), "new_samples": n_new}
        if not new or n_new < min_new:
            self.book.append("skip", reason=f"{n_new} new samples in {len(new)} shards since "
                                            f"{last or 'the start'} (min_new_samples {min_new})", **facts)
            return 0
        name = f"{as_of:%Y%m%dT%H%M%SZ}-{snap.digest()[:10]}"
        promoted, _ = read_promoted(self.root, self.opts)
        init_from = promoted["checkpoint"] if promoted else None
        run_cfg = self.run_config(name, init_from)
        save_snapshot(snap, run_cfg.run, self.opts)  # the run trains on exactly the manifest as of TIME
        self.lease.update(run=name, init_from=init_from, as_of=_iso(as_of))
        self.book.append("start", run=name, reason=f"{n_new} new samples in {len(new)} shards", **facts,
                         total_samples=snap.n_samples, steps=run_cfg.train.steps, init_from=init_from)
        return self.train_and_judge(run_cfg, name, resume=False)

    def resume(self, previous: dict[str, Any]) -> int:
        """The holder of an expired lease died mid-run: continue its run from the newest checkpoint."""
        from selfsup.trainers import checkpoint as ck
        from selfsup.trainers.config import PretrainConfig

        name = previous["run"]
        judged = [e for e in self.book.entries() if e.get("run") == name and e["decision"] in ("promote", "reject")]
        self.lease.update(run=name, init_from=previous.get("init_from"), as_of=previous.get("as_of"))
        if judged:
            self.book.append("skip", run=name, reason=f"run {name} was already judged ({judged[-1]['decision']}) "
                                                      "before its holder died")
            return 0
        run_url = storage.join(self.root, name)
        saved = storage.join(run_url, "config.yaml")
        if storage.exists(saved, self.opts):  # the run's own resolved config (storage secrets re-added)
            run_cfg = dataclasses.replace(load_config(PretrainConfig, saved), storage=dict(self.cfg.storage))
        else:
            run_cfg = self.run_config(name, previous.get("init_from"))
        found = ck.list_checkpoints(run_url, self.opts)
        why = (f"{previous.get('owner')} handed the run over" if previous.get("handover") else
               f"lease of {previous.get('owner')} expired {_iso(previous.get('expires'))}")
        self.book.append("resume", run=name, reason=why,
                         from_step=found[-1][0] if found else 0, previous_owner=previous.get("owner"))
        return self.train_and_judge(run_cfg, name, resume=True)

    def run_config(self, name: str, init_from: Optional[str]) -> Any:
        """The config of retrain run `name`: its folder, the retrain step count, the warm start."""
        c = self.cfg
        train = dataclasses.replace(c.train, steps=c.retrain.steps or c.train.steps, init_from=init_from)
        return dataclasses.replace(c, run=storage.join(self.root, name), train=train)

    def train_and_judge(self, run_cfg: Any, name: str, resume: bool) -> int:
        step = self.train(run_cfg, resume)
        if step < run_cfg.train.steps:  # e.g. train.time_limit_minutes: hand the run to the next invocation
            self.lease.update(handover=True)
            self.book.append("stopped", run=name, reason=f"training stopped at step {step}/{run_cfg.train.steps}; "
                                                          "the next retrain resumes it", step=step)
            return 0
        result = self.evaluate(run_cfg)
        return self.judge(run_cfg, name, result)

    def train(self, cfg: Any, resume: bool) -> int:
        """Pretrain in this process (on the current Ray cluster, or without Ray); returns the last checkpoint's step."""
        from selfsup.jobs import pretrain as pt
        from selfsup.trainers import checkpoint as ck

        if self.args.no_ray:
            cfg = dataclasses.replace(cfg, scaling=dataclasses.replace(cfg.scaling, num_workers=1),
                                      data=dataclasses.replace(cfg.data, backend="local" if cfg.data.backend == "ray"
                                                               else cfg.data.backend))
        resume_from = pt.prepare_run(cfg, resume)
        progress = pt.Progress(cfg, quiet=self.args.quiet)
        progress.start()
        try:
            if self.args.no_ray:
                pt.train_here(cfg, resume_from)
            else:
                pt.train_on_ray(cfg, resume_from, self.args.address)
        except BaseException as e:
            pt.set_status(cfg, "failed", error=storage.redact(f"{type(e).__name__}: {e}"))
            raise
        finally:
            progress.stop()
        found = ck.list_checkpoints(cfg.run, self.opts)
        step = found[-1][0] if found else 0
        pt.finish(cfg, stopped=step < cfg.train.steps)
        return step

    def evaluate(self, cfg: Any) -> dict[str, Any]:
        """Evaluate the run's last checkpoint; its accuracy and the random-init baseline."""
        from selfsup.jobs.common import ensure_ray
        from selfsup.jobs.evaluate import EvalJob, parse_eval_sets
        from selfsup.trainers import checkpoint as ck

        r = cfg.retrain
        ckpt = ck.resolve_checkpoint(cfg.run, self.opts)
        es = parse_eval_sets([r.eval_set] if r.eval_set else [], cfg.run, self.opts)[0]
        ns = argparse.Namespace(no_baselines=False, workers=2, worker_cpus=1.0, gpus=0.0, batch_size=256,
                                quiet=True, no_ray=self.args.no_ray)
        if not self.args.no_ray:
            ensure_ray(self.args.address)
        EvalJob(cfg.run, [es], [r.metric], r.target, self.opts, ns).evaluate(ckpt)
        return {"checkpoint": ckpt, "step": int(ck.read_meta(ckpt, self.opts)["step"]), "eval_set": es.name,
                "metric": r.metric, "target": r.target,
                "accuracy": accuracy(cfg.run, ckpt, es.name, r.target, r.metric, "pretrained", self.opts),
                "random_init": accuracy(cfg.run, ckpt, es.name, r.target, r.metric, "random_init", self.opts)}

    def judge(self, cfg: Any, name: str, result: dict[str, Any]) -> int:
        """Promote when not worse than the promoted model by more than the tolerance (first: beat random init)."""
        promoted, version = read_promoted(self.root, self.opts)
        acc, tol = result["accuracy"], cfg.retrain.tolerance
        facts = {k: result[k] for k in ("step", "eval_set", "metric", "target", "accuracy", "random_init")}
        if promoted and promoted.get("run") == name:
            self.book.append("promote", run=name, reason="already promoted", **facts)
            return 0
        if promoted is None:
            ok = acc > result["random_init"]
            why = f"{result['metric']} accuracy {acc:.4f} {'>' if ok else '<='} random init {result['random_init']:.4f}"
        else:
            ref = self.promoted_accuracy(promoted, result)
            facts["promoted_run"], facts["promoted_accuracy"] = promoted.get("run"), ref
            ok = acc >= ref - tol
            why = (f"{result['metric']} accuracy {acc:.4f} vs promoted {ref:.4f} ({promoted.get('run')}), "
                   f"tolerance {tol}")
        if self.lease.lost.is_set():
            self.book.append("lost-lease", run=name, reason="the lease was taken over during the run; "
                                                            "not promoting", **facts)
            return 1
        if not ok:
            self.book.append("reject", run=name, reason=why, **facts)
            print(f"retrain: rejected {name}: {why}")
            return 0
        return self.promote(cfg, name, result, version, why, facts)

    def promoted_accuracy(self, promoted: dict[str, Any], result: dict[str, Any]) -> float:
        """The promoted model's accuracy on this eval set and metric (stored, else evaluated now)."""
        keys = ("eval_set", "metric", "target")
        if all(promoted.get(k) == result[k] for k in keys) and promoted.get("accuracy") is not None:
            return float(promoted["accuracy"])
        from selfsup.jobs.evaluate import EvalJob, parse_eval_sets, run_of

        r = self.cfg.retrain
        other = run_of(promoted["checkpoint"])
        es = parse_eval_sets([r.eval_set] if r.eval_set else [], other, self.opts)[0]
        ns = argparse.Namespace(no_baselines=True, workers=2, worker_cpus=1.0, gpus=0.0, batch_size=256,
                                quiet=True, no_ray=self.args.no_ray)
        EvalJob(other, [es], [r.metric], r.target, self.opts, ns).evaluate(promoted["checkpoint"])
        return accuracy(other, promoted["checkpoint"], es.name, r.target, r.metric, "pretrained", self.opts)

    def promote(self, cfg: Any, name: str, result: dict[str, Any], version: Optional[str], why: str,
                facts: dict[str, Any]) -> int:
        """`<run>/promoted.json` (retention keeps the step), then `<runs>/promoted.json` by a conditional write."""
        from selfsup.trainers import checkpoint as ck

        storage.write_text(storage.join(cfg.run, ck.PROMOTED), json.dumps({"step": result["step"]}), self.opts)
        body = json.dumps({"run": name, "run_url": cfg.run, **{k: result[k] for k in (
            "checkpoint", "step", "eval_set", "metric", "target", "accuracy", "random_init")},
            "promoted_at": _iso(time.time())}, indent=1).encode()
        url = storage.join(self.root, PROMOTED)
        done = (storage.write_if_absent(url, body, self.opts) if version is None
                else storage.write_if_version(url, body, version, self.opts))
        if not done:
            self.book.append("reject", run=name, reason="promoted.json changed while this run was judged", **facts)
            return 1
        self.book.append("promote", run=name, reason=why, **facts)
        print(f"retrain: promoted {name} step {result['step']}: {why}")
        return 0


def read_promoted(root: str, opts: Any = None) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """(`<runs>/promoted.json`, its version) or (None, None)."""
    data, version = storage.read_versioned(storage.join(root, PROMOTED), opts)
    return (json.loads(data), version) if data is not None else (None, None)


def accuracy(run_dir: str, ckpt: str, eval_set: str, target: str, method: str, encoder: str, opts: Any) -> float:
    """One accuracy from `<run>/eval/results.parquet` (the checkpoint's, or its architecture's baseline)."""
    from selfsup.jobs.evaluate import read_results

    table = read_results(run_dir, opts)
    rows = [r for r in (table.to_pylist() if table is not None else [])
            if r["eval_set"] == eval_set and r["target"] == target and r["method"] == method
            and r["encoder"] == encoder and (encoder != "pretrained" or r["checkpoint"] == ckpt)]
    if not rows:
        raise ValueError(f"no {encoder} {method} result for {eval_set}/{target} in {storage.redact_url(run_dir)}")
    return float(rows[-1]["accuracy"])
