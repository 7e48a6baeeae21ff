"""`selfsup demo`: the main job on the embedded default — real data → shards → (pretraining → evaluation)."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from jobs.data import find_dataset, missing_line


def add_parser(sub: Any) -> None:
    """Register `selfsup demo`."""
    p = sub.add_parser("demo", help="run the whole chain on bundled real data (local Ray, local folder)",
                       description="Write Fashion-MNIST and spoken-digit shards into a local folder and "
                                   "list them.")
    p.add_argument("--data", help="folder holding the datasets (default: $SELFSUP_DATA, "
                                  "/usr/share/datasets, ../shared/datasets)")
    p.add_argument("--out", default="runs/demo", help="local folder (or URL) for shards and runs (default runs/demo)")
    p.set_defaults(run=run)


def write(source: str, dest: str, *args: str) -> None:
    """Run `selfsup shards write` in this process."""
    from jobs.cli import main

    code = main(["shards", "write", source, dest, *args])
    if code:
        raise SystemExit(code)


def run(args: argparse.Namespace) -> int:
    """Write the demo datasets into shards and list them."""
    from jobs.cli import main

    wrote = []
    fm = find_dataset("fashion-mnist", args.data)
    if fm:
        dest = f"{args.out}/data/fashion-mnist"
        write(str(fm), dest, "--modality", "image", "--split", "pretrain", "--subset", "train",
              "--samples-per-shard", "10000")
        write(str(fm), dest, "--modality", "image", "--split", "probe-train", "--subset", "train",
              "--samples-per-shard", "10000")
        write(str(fm), dest, "--modality", "image", "--split", "probe-test", "--subset", "test",
              "--samples-per-shard", "10000")
        wrote.append(dest)
    else:
        print(missing_line("fashion-mnist", args.data), file=sys.stderr)
    fsdd = find_dataset("fsdd", args.data)
    if fsdd:
        dest = f"{args.out}/data/spoken-digits"
        write(str(fsdd), dest, "--modality", "audio", "--split", "pretrain", "--exclude", "_theo_",
              "--samples-per-shard", "500")
        wrote.append(dest)
    else:
        print(missing_line("fsdd", args.data), file=sys.stderr)
    for dest in wrote:
        print(f"\n== {dest}")
        main(["shards", "ls", dest, "--totals"])
    return 0 if wrote else 1
