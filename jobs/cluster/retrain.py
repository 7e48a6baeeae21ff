"""The retrain engine behind `selfsup retrain`: idempotent scheduled retraining.

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

import dataclasses
import datetime as dt
import json
import sys
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from selfsup.jobs.evaluation import results
from selfsup.jobs.evaluation.job import METHODS, EvalJob, EvalOptions, parse_eval_sets, run_of
from selfsup.jobs.training import TrainOptions, train
from selfsup.pipeline import lease as leases
from selfsup.pipeline import storage
from selfsup.pipeline.snapshot import ShardRef, Snapshot
from selfsup.trainers import run_folder as rf
from selfsup.trainers.config import PretrainConfig

LEASE, LOG, PROMOTED = "retrain.lease", "retrain-log.jsonl", "promoted.json"


ATTEMPTS = ("start", "resume")


@dataclass(frozen=True)
class RetrainOptions:
    """One retrain invocation: the manifest time, the new-data threshold, where to train and evaluate."""

    as_of: dt.datetime
    min_new_samples: Optional[int] = None  # None: retrain.min_new_samples
    use_ray: bool = True  # False: train and evaluate in this process
    address: Optional[str] = None  # Ray cluster address (default $RAY_ADDRESS, else a local one)
    quiet: bool = False  # no progress line


def retrain(cfg: PretrainConfig, options: RetrainOptions) -> int:
    """Take the lease, decide, and (maybe) train, evaluate and promote; returns the exit status."""
    root = storage.full_url(cfg.retrain.runs or cfg.run)
    opts = cfg.storage_options
    leases.check_supported(root)
    min_new = cfg.retrain.min_new_samples if options.min_new_samples is None else options.min_new_samples
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
            job = Retrain(cfg, root, lease, book, options)
            if taken.previous.get("run"):
                return job.resume(taken.previous)
            return job.maybe_start(options.as_of, min_new)
    except Exception as e:  # noqa: BLE001 - record any failure, then report it like other commands
        error = storage.redact(f"{type(e).__name__}: {e}")[:2000]
        book.append("failed", run=lease.fields.get("run"), reason=error)
        if isinstance(e, (ValueError, FileNotFoundError, PermissionError)):
            raise
        print(f"selfsup retrain: failed: {error}", file=sys.stderr)
        return 1
    finally:
        lease.release()


def check(cfg: PretrainConfig) -> PretrainConfig:
    """Retrain settings that types alone cannot check."""
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

    def __init__(self, root: str, owner: str, opts: Optional[Mapping[str, Any]]) -> None:
        self.url, self.owner, self.opts = storage.join(root, LOG), owner, opts

    def append(self, decision: str, **fields: Any) -> dict[str, Any]:
        """Record one decision (fields that are None are left out) and echo it."""
        entry = {"time": _iso(time.time()), "decision": decision, "owner": self.owner,
                 **{k: v for k, v in fields.items() if v is not None}}
        storage.append_line(self.url, json.dumps(entry, default=str), self.opts)
        detail = entry.get("reason") or entry.get("run") or ""
        print(f"selfsup retrain: {decision}: {detail}", file=sys.stderr)
        return entry

    def entries(self) -> list[dict[str, Any]]:
        """Every decision so far, oldest first."""
        if not storage.exists(self.url, self.opts):
            return []
        return [json.loads(x) for x in storage.read_text(self.url, self.opts).splitlines() if x.strip()]


def last_attempt(entries: list[dict[str, Any]]) -> Optional[str]:
    """The run of the newest start/resume entry."""
    runs = [e["run"] for e in entries if e.get("decision") in ATTEMPTS and e.get("run")]
    return runs[-1] if runs else None


def new_shards(snap: Snapshot, previous: Optional[Snapshot]) -> list[ShardRef]:
    """Shards of `snap` that `previous` (a snapshot or None) does not hold, by URL and content hash."""
    seen = {(s.url, s.sha256) for s in previous.shards} if previous is not None else set()
    return [s for s in snap.shards if (s.url, s.sha256) not in seen]


class Retrain:
    """One invocation holding the lease."""

    def __init__(self, cfg: PretrainConfig, root: str, lease: leases.Lease, book: RetrainLog,
                 options: RetrainOptions) -> None:
        self.cfg, self.root, self.lease, self.book, self.options = cfg, root, lease, book, options
        self.opts = cfg.storage_options

    def maybe_start(self, as_of: dt.datetime, min_new: int) -> int:
        """Compare the manifest with the last attempt's snapshot; start a run when enough is new."""
        from selfsup.pipeline.snapshot import build_snapshot, load_snapshot, save_snapshot

        last = last_attempt(self.book.entries())
        snap = build_snapshot(self.cfg.data.sources, self.cfg.data.modality, self.opts, as_of=as_of)
        previous = None
        if last and storage.exists(rf.manifest_url(storage.join(self.root, last)), self.opts):
            previous = load_snapshot(storage.join(self.root, last), self.opts)
        elif last:
            print(f"selfsup retrain: warning: the last attempted run {last} has no {rf.MANIFEST} any more; "
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

        name = previous["run"]
        judged = [e for e in self.book.entries() if e.get("run") == name and e["decision"] in ("promote", "reject")]
        self.lease.update(run=name, init_from=previous.get("init_from"), as_of=previous.get("as_of"))
        if judged:
            self.book.append("skip", run=name, reason=f"run {name} was already judged ({judged[-1]['decision']}) "
                                                      "before its holder died")
            return 0
        run_url = storage.join(self.root, name)
        saved = rf.read_config(run_url, self.opts)
        if saved is not None:  # the run's own resolved config (storage secrets re-added)
            run_cfg = dataclasses.replace(saved, storage=dict(self.cfg.storage))
        else:
            run_cfg = self.run_config(name, previous.get("init_from"))
        found = ck.list_checkpoints(run_url, self.opts)
        why = (f"{previous.get('owner')} handed the run over" if previous.get("handover") else
               f"lease of {previous.get('owner')} expired {_iso(previous.get('expires'))}")
        self.book.append("resume", run=name, reason=why,
                         from_step=found[-1][0] if found else 0, previous_owner=previous.get("owner"))
        return self.train_and_judge(run_cfg, name, resume=True)

    def run_config(self, name: str, init_from: Optional[str]) -> PretrainConfig:
        """The config of retrain run `name`: its folder, the retrain step count, the warm start."""
        c = self.cfg
        train = dataclasses.replace(c.train, init_from=init_from)
        if c.retrain.steps:  # wins over a recipe's train.samples too
            train = dataclasses.replace(train, steps=c.retrain.steps, samples=None)
        return dataclasses.replace(c, run=storage.join(self.root, name), train=train)

    def train_and_judge(self, run_cfg: PretrainConfig, name: str, resume: bool) -> int:
        """Train the run; hand it over when it stopped early, else evaluate and judge it."""
        o = self.options
        trained = train(run_cfg, TrainOptions(
            resume=resume, use_ray=o.use_ray, address=o.address, quiet=o.quiet, stop_when=self.lease.lost,
            stop_reason=f"this retrain ({self.lease.owner}) lost {LEASE} to another invocation",
            lease_seconds=min(60.0, self.cfg.retrain.lease_seconds),
            wait_for_folder_s=self.cfg.retrain.lease_seconds if resume else 0.0))  # its old trainer stopping
        step = trained.step
        if self.lease.lost.is_set():  # the workers checkpointed and stopped; the new holder resumes the run
            self.book.append("lost-lease", run=name, step=step,
                             reason=f"the lease was taken over during training; stopped with a checkpoint at "
                                    f"step {step}/{run_cfg.train.steps} for the new holder to resume")
            return 1
        if trained.stopped:  # e.g. train.time_limit_minutes: hand the run to the next invocation
            self.lease.update(handover=True)
            self.book.append("stopped", run=name, reason=f"training stopped at step {step}/{run_cfg.train.steps}; "
                                                          "the next retrain resumes it", step=step)
            return 0
        result = self.evaluate(run_cfg)
        return self.judge(run_cfg, name, result)

    def evaluate(self, cfg: PretrainConfig) -> dict[str, Any]:
        """Evaluate the run's last checkpoint; its accuracy and the random-init baseline."""
        from selfsup.jobs.common import ensure_ray
        from selfsup.trainers import checkpoint as ck

        r = cfg.retrain
        ckpt = ck.resolve_checkpoint(cfg.run, self.opts)
        es = parse_eval_sets([r.eval_set] if r.eval_set else [], cfg.run, self.opts)[0]
        if self.options.use_ray:
            ensure_ray(self.options.address)
        EvalJob(cfg.run, [es], [r.metric], r.target, self.opts, self.eval_options(no_baselines=False)).evaluate(ckpt)

        def stored(encoder: str) -> float:
            return results.accuracy(cfg.run, es.name, r.target, r.metric, encoder, ckpt, self.opts)

        return {"checkpoint": ckpt, "step": int(ck.read_meta(ckpt, self.opts)["step"]), "eval_set": es.name,
                "metric": r.metric, "target": r.target, "accuracy": stored("pretrained"),
                "random_init": stored("random_init")}

    def eval_options(self, no_baselines: bool) -> EvalOptions:
        """Evaluation settings of retrain: two quiet extraction workers, Ray unless --no-ray."""
        return EvalOptions(no_baselines=no_baselines, quiet=True, use_ray=self.options.use_ray)

    def judge(self, cfg: PretrainConfig, name: str, result: dict[str, Any]) -> int:
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
        r = self.cfg.retrain
        other = run_of(promoted["checkpoint"])
        es = parse_eval_sets([r.eval_set] if r.eval_set else [], other, self.opts)[0]
        EvalJob(other, [es], [r.metric], r.target, self.opts,
                self.eval_options(no_baselines=True)).evaluate(promoted["checkpoint"])
        return results.accuracy(other, es.name, r.target, r.metric, "pretrained", promoted["checkpoint"], self.opts)

    def promote(self, cfg: PretrainConfig, name: str, result: dict[str, Any], version: Optional[str], why: str,
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


def read_promoted(root: str,
                  opts: Optional[Mapping[str, Any]] = None) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """(`<runs>/promoted.json`, its version) or (None, None)."""
    data, version = storage.read_versioned(storage.join(root, PROMOTED), opts)
    return (json.loads(data), version) if data is not None else (None, None)
