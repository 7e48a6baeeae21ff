"""`selfsup shards write|ls|verify|rm`: turn media into indexed WebDataset shards and manage them."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

from tqdm import tqdm

from selfsup.pipeline import external, ledger, manifest, storage, writer
from selfsup.pipeline.media import EXTENSIONS
from selfsup.pipeline.sources import (DEFAULT_MAX_ITEM_BYTES, SOURCES, Source, SourceOptions, apply_filters,
                                     detect_source, make_source, KeyReport, item_name, unique_keys)
from selfsup.pipeline.verify import verify_dataset
from selfsup.jobs.common import add_storage_args, human_bytes, storage_options

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'256MB' → 256000000; '64MiB' → 67108864."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 256MB, 1GB, 64MiB")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])


def add_parser(sub: Any) -> None:
    """Register `selfsup shards ...`."""
    p = sub.add_parser("shards", help="write, add, list, verify and retire WebDataset shards",
                       description="Manage WebDataset shards: every shard has an index (.idx) and a "
                                   "manifest row under DEST/_manifest/.")
    ssub = p.add_subparsers(dest="shards_command", metavar="ACTION", required=True)

    w = ssub.add_parser("write", help="write a source (folder, Fashion-MNIST, spoken digits, videos) into shards",
                        description="Write SOURCE into shards under DEST. Sample order is shuffled (seeded); "
                                    "rerunning the same command completes an interrupted job without "
                                    "rewriting finished shards.")
    w.add_argument("source", metavar="SOURCE", help="a folder of media files, the Fashion-MNIST IDX folder, "
                                                    "the spoken-digit recordings folder, or a SoundFont (.sf2)")
    add_target_args(w)
    w.add_argument("--labels", default="auto",
                   help="auto (the source's labels for probe-* splits, none for others), none, folder "
                        "(parent folder name), or a regex whose first group is the label")
    w.add_argument("--source-type", choices=SOURCES.names(), help="override source detection")
    w.add_argument("--subset", default="train", help="Fashion-MNIST subset: train or test; SoundFont notes: train, test "
                                                         "or all (default train)")
    w.add_argument("--include", help="keep only items whose name matches this regex")
    w.add_argument("--exclude", help="drop items whose name matches this regex (e.g. '_theo_')")
    w.add_argument("--limit", type=int, help="write at most N items (a seeded random subset)")
    w.add_argument("--shard-size", type=parse_size, default=writer.DEFAULT_SHARD_BYTES,
                   help="target shard size (default 256MB)")
    w.add_argument("--samples-per-shard", type=int, help="exact samples per shard (overrides --shard-size)")
    w.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    w.add_argument("--no-shuffle", action="store_true", help="keep the source order inside shards")
    w.add_argument("--reencode", action="store_true",
                   help="video: re-encode to MP4 (H.264) with a short keyframe interval for fast clip access")
    w.add_argument("--max-item-bytes", type=parse_size, default=DEFAULT_MAX_ITEM_BYTES,
                   help="skip (or with --strict, stop at) source files larger than this, unread "
                        "(default 256MiB; raise it for long videos)")
    w.add_argument("--strict", action="store_true", help="stop at the first unreadable source file")
    w.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes")
    w.add_argument("--quiet", action="store_true", help="no progress bar")
    add_storage_args(w)
    w.set_defaults(run=run_write)

    a = ssub.add_parser("add", help="add existing WebDataset tars (s3://, gs://, local) in place, without re-encoding",
                        description="Index existing WebDataset tars where they are and add manifest rows to DEST "
                                    "that point at them (the tars are neither copied nor rewritten). Each index "
                                    "goes beside its tar (<name>.idx), or under DEST/_external/ when the source "
                                    "is read-only or --index-in-dest is given. Members the modality does not read "
                                    "(.json, .cls, .txt) are kept and ignored. Adding the same tars again adds "
                                    "nothing.")
    a.add_argument("source", metavar="URL_OR_GLOB", help="a tar, a glob ('s3://bucket/laion/*.tar', "
                                                         "'data/**/*.tar'; quote it), or a folder (every tar under it)")
    add_target_args(a)
    a.add_argument("--index-in-dest", action="store_true", help="write the indexes under DEST, never beside the tars")
    a.add_argument("--workers", type=int, default=4, help="tars read at once (default 4)")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    add_storage_args(a)
    a.set_defaults(run=run_add)

    ls = ssub.add_parser("ls", help="list the visible shards of a dataset")
    ls.add_argument("dest", metavar="DEST")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.add_argument("--totals", action="store_true", help="only the per-(modality, split) totals")
    ls.add_argument("--items", action="store_true",
                    help="the source items the dataset holds (name, sample key, shard), from its ledger")
    add_storage_args(ls)
    ls.set_defaults(run=run_ls)

    v = ssub.add_parser("verify", help="re-read every shard; check counts, index and hashes")
    v.add_argument("dest", metavar="DEST")
    v.add_argument("--json", action="store_true")
    add_storage_args(v)
    v.set_defaults(run=run_verify)

    rm = ssub.add_parser("rm", help="retire shards (a tombstone row; history is kept)")
    rm.add_argument("dest", metavar="DEST")
    rm.add_argument("shards", nargs="+", metavar="SHARD", help="shard paths as `shards ls` prints them")
    add_storage_args(rm)
    rm.set_defaults(run=run_rm)


def add_target_args(p: argparse.ArgumentParser) -> None:
    """DEST, --modality and --split: where shards go and what they hold (`write` and `add`)."""
    p.add_argument("dest", metavar="DEST", help="dataset location: a path or URL (s3://bucket/prefix, ...)")
    p.add_argument("--modality", required=True, choices=sorted(EXTENSIONS))
    p.add_argument("--split", default="pretrain",
                   help="split name; conventions: pretrain, probe-train, probe-test (default: pretrain)")


def open_source(args: argparse.Namespace) -> tuple[Source, str]:
    """The source object for SOURCE and its type name; clear errors for mismatches."""
    root = os.path.abspath(args.source)
    if not os.path.exists(root):
        raise FileNotFoundError(f"source {args.source} does not exist")
    kind = detect_source(root, args.modality, args.source_type)
    if not os.path.isdir(root) and not SOURCES.get(kind).detect(root):
        raise ValueError(f"source {args.source} must be a folder (or a file its source type reads: a SoundFont .sf2)")
    natural = SOURCES.get(kind).natural_modality
    if natural and natural != args.modality:
        raise ValueError(f"{args.source} is a {kind} source ({natural}), not {args.modality}: "
                         f"use --modality {natural}")
    labels = args.labels
    if labels == "auto":  # a source's own labels go into probe splits only
        labels = "auto" if args.split.startswith("probe") else "none"
    options = SourceOptions(args.modality, labels, args.subset, args.seed)
    return make_source(kind, root, options), kind


def run_write(args: argparse.Namespace) -> int:
    """`selfsup shards write`."""
    opts = storage_options(args)
    writer.check_split(args.split)
    if args.max_item_bytes < 1:
        raise ValueError(f"--max-item-bytes must be at least 1 byte, got {args.max_item_bytes}")
    source, kind = open_source(args)
    storage.check_writable(args.dest, opts)
    items, label_names = source.items()
    items = apply_filters(items, args.include, args.exclude)
    if args.limit is not None:
        from selfsup.pipeline.seeding import rng_for

        keep = sorted(rng_for("limit", args.seed).permutation(len(items))[: args.limit])
        items = [items[int(i)] for i in keep]
    items, keys = unique_keys(items)
    if args.strict and keys.rejected:
        name, why = keys.rejected[0]
        raise ValueError(f"{name}: {why} (--strict)")
    if not items:
        raise ValueError(f"no items left in {args.source} after --include/--exclude/--limit")
    per_shard = writer.shard_sizes(items, args.samples_per_shard, args.shard_size)
    transform = None
    if args.reencode:
        if args.modality != "video":
            raise ValueError("--reencode applies to --modality video only")
        transform = _reencode
    parts: dict[str, Any] = {
        "source_type": kind, "source": source, "split": args.split, "modality": args.modality,
        "include": args.include, "exclude": args.exclude, "limit": args.limit, "seed": args.seed,
        "per_shard": per_shard, "reencode": args.reencode, "shuffle": not args.no_shuffle}
    scope = writer.scope_digest(parts)
    inc = writer.compare_with_dataset(items, ledger.read_holdings(args.dest, manifest.read_manifest(args.dest, opts),
                                                                  opts), scope)
    if inc.held:  # a rerun over a dataset holding some of these items: the rest become new shards
        parts["pending"] = writer.job_digest({"names": sorted(item_name(it) for it in inc.pending)})
    jobs = writer.plan_jobs(source, inc.pending, label_names, args.dest, args.modality, args.split, per_shard,
                            parts, args.seed, not args.no_shuffle, options=opts, strict=args.strict,
                            transform=transform, scope=scope, max_item_bytes=args.max_item_bytes)
    bar = tqdm(total=len(inc.pending), unit="sample", desc=f"shards write {args.split}", disable=args.quiet,
               file=sys.stderr)
    report = writer.run_jobs(jobs, args.workers, progress=bar.update, options=opts)
    bar.close()
    print(f"{report.shards_written} shard(s) written, {report.shards_existing + inc.shards_held} already present, "
          f"{report.samples} samples; {len(report.skipped)} unreadable source file(s) skipped"
          + (":" if report.skipped else ""))
    for ref, err in report.skipped[:50]:
        print(f"  skipped {ref}: {err}")
    if len(report.skipped) > 50:
        print(f"  ... and {len(report.skipped) - 50} more")
    _print_keys(keys)
    _print_increment(inc)
    return 0


def run_add(args: argparse.Namespace) -> int:
    """`selfsup shards add`: index third-party tars in place and add their manifest rows."""
    opts = storage_options(args)
    writer.check_split(args.split)
    urls = external.find_tars(args.source, opts)
    storage.check_writable(args.dest, opts)
    with tqdm(total=len(urls), unit="shard", desc=f"shards add {args.split}", disable=args.quiet,
              file=sys.stderr) as bar:
        report = external.add_tars(urls, args.dest, args.modality, args.split, args.index_in_dest, args.workers,
                                   opts, progress=bar.update)
    print(f"{len(report.added)} shard(s) added ({report.samples} samples), {len(report.present)} already present, "
          f"{len(report.refused)} refused")
    for url, why in report.changed:
        print(f"  changed {storage.redact_url(url)}: {why}; not added again (`shards rm` it, then add it again)")
    if report.refused:
        raise ValueError(f"{len(report.refused)} shard(s) not added: "
                         + "; ".join(why for _, why in report.refused[:10]))
    return 0


def _print_increment(inc: writer.Increment) -> None:
    """What a rerun found already in the dataset, changed since, or gone from the source."""
    if inc.held:
        print(f"{inc.held} item(s) already in the dataset, {len(inc.pending)} new")
    if inc.changed:
        print(f"{len(inc.changed)} item(s) changed since they were written; not written (the dataset keeps "
              "the version it has: `shards rm` the shard and rerun to replace it):")
        for name, shard in inc.changed[:50]:
            print(f"  changed {name} (in {shard})")
    if inc.removed:
        print(f"{len(inc.removed)} item(s) in the dataset are no longer in the source (kept)")
    for name, key in inc.renamed[:50]:
        print(f"  {name} -> key {key} (its key is held by another item)")


def _print_keys(keys: KeyReport) -> None:
    """Items whose sample key collided: renamed (deterministic suffix) or left out."""
    if keys.renamed:
        print(f"{len(keys.renamed)} item(s) share a sample key with another and got a suffix:")
        for name, key in keys.renamed[:50]:
            print(f"  {name} -> key {key}")
    if keys.rejected:
        print(f"{len(keys.rejected)} item(s) left out for their sample key:")
        for name, why in keys.rejected[:50]:
            print(f"  left out {name}: {why}")


def _reencode(members: dict[str, bytes]) -> dict[str, bytes]:
    from selfsup.pipeline.modalities.video import reencode_mp4

    ext = next(e for e in members if e in EXTENSIONS["video"])
    return {**{k: v for k, v in members.items() if k != ext}, "mp4": reencode_mp4(members[ext])}


def run_ls(args: argparse.Namespace) -> int:
    """`selfsup shards ls`."""
    opts = storage_options(args)
    manifest.require_dataset(args.dest, opts)
    rows, bad = manifest.read_manifest_lenient(args.dest, opts)
    for b in bad:  # named, then the readable parts are listed
        print(f"warning: unreadable manifest part {b.describe()}; its rows are not listed "
              "(move or delete it; `selfsup shards verify` reports it too)", file=sys.stderr)
    totals = manifest.summarize(rows)
    if args.items:
        return _print_items(ledger.read_holdings(args.dest, rows, opts), args.json)
    if args.json:
        shards = [{k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in r.items()} for r in rows]
        print(json.dumps({"dataset": storage.redact_url(args.dest), "totals": totals,
                          "unreadable_parts": [{"part": storage.redact_url(b.url), "reason": b.reason} for b in bad],
                          **({} if args.totals else {"shards": shards})}, indent=2))
        return 0
    if not rows:
        print(f"no visible shards in {storage.redact_url(args.dest)}")
        return 0
    if not args.totals:
        width = max(len(r["path"]) for r in rows)
        print(f"{'shard':<{width}}  {'samples':>8}  {'bytes':>10}  {'modality':<8}  split")
        for r in rows:
            print(f"{r['path']:<{width}}  {r['n_samples']:>8}  {human_bytes(r['n_bytes']):>10}  "
                  f"{r['modality']:<8}  {r['split']}")
        print()
    print(f"{'modality':<8}  {'split':<12}  {'shards':>6}  {'samples':>8}  {'bytes':>10}")
    for t in totals:
        print(f"{t['modality']:<8}  {t['split']:<12}  {t['shards']:>6}  {t['samples']:>8}  "
              f"{human_bytes(t['bytes']):>10}")
    return 0


def _print_items(held: ledger.Holdings, as_json: bool) -> int:
    """`shards ls --items`: every source item held by a visible shard."""
    items = [{"item": e.name, "key": e.key, "shard": e.shard} for e in held.entries]
    if as_json:
        print(json.dumps({"items": items, "shards_without_ledger": held.without_ledger}, indent=2))
        return 0
    for e in items:
        print(f"{e['item']}  {e['key']}  {e['shard']}")
    print(f"{len(items)} item(s)" + (f"; {len(held.without_ledger)} shard(s) written before ledgers "
                                      "do not say which items they hold" if held.without_ledger else ""))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    """`selfsup shards verify`: exit 1 if any shard is corrupt."""
    opts = storage_options(args)
    manifest.require_dataset(args.dest, opts)  # before the bar: a wrong location is one clear line
    with tqdm(unit="shard", desc="verify", file=sys.stderr) as bar:
        checks = verify_dataset(args.dest, opts, progress=bar)
    bad = [c for c in checks if not c.ok]
    if args.json:
        print(json.dumps({"shards": len(checks), "corrupt": [
            {"shard": c.path, "problems": c.problems, "members": c.bad_members} for c in bad]}, indent=2))
    else:
        for c in bad:
            print(f"CORRUPT {c.path}: " + "; ".join(c.problems))
        print(f"{len(checks)} shard(s) checked, {len(bad)} corrupt")
    return 1 if bad else 0


def run_rm(args: argparse.Namespace) -> int:
    """`selfsup shards rm`."""
    n = manifest.tombstone(args.dest, args.shards, storage_options(args))
    print(f"retired {n} shard(s); their files stay until you delete them")
    return 0

