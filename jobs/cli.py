"""The `selfsup` command line: one subcommand module per job, dispatched from here."""
from __future__ import annotations

import argparse
import atexit
import importlib
import logging
import os
import sys
import threading
import traceback
from typing import Optional, Sequence

# subcommand → module in jobs/ exposing add_parser(subparsers) and run(args) -> int
COMMANDS = {
    "shards": "selfsup.jobs.commands.shards",
    "pretrain": "selfsup.jobs.commands.pretrain",
    "evaluate": "selfsup.jobs.commands.evaluate",
    "runs": "selfsup.jobs.commands.runs",
    "demo": "selfsup.jobs.commands.demo",
    "bench": "selfsup.jobs.commands.bench",
    "submit": "selfsup.jobs.commands.submit",
    "jobs": "selfsup.jobs.commands.jobs",
    "retrain": "selfsup.jobs.commands.retrain",
    "export": "selfsup.jobs.commands.export",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="selfsup",
        description="Self-supervised pretraining on Ray: WebDataset shards in object storage → "
                    "streamed, augmented batches → DDP pretraining → evaluated checkpoints.",
        epilog="Run `selfsup COMMAND --help` for a command's options. Locations are local paths "
               "or URLs (file://, s3://, gs://, memory://).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        mod.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `selfsup` console script."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, PermissionError) as e:
        if args.verbose:
            raise
        print(f"selfsup {args.command}: error: {e}", file=sys.stderr)
        return 2


def console() -> None:
    """The console script: `main`, then an exit that skips the interpreter's native teardown.

    After a command has finished, libraries' native thread pools (Arrow's reading Parquet above
    all) can abort the process while the interpreter finalizes ("terminate called without an
    active exception", exit -6): a finished `selfsup shards verify` failed that way about once in
    15 runs on a loaded machine. So the exit does what finalization does for Python code (joins
    threads, runs atexit handlers such as Ray's shutdown, flushes output) and then ends the process
    before native destructors run.
    """
    try:
        code = main()
    except SystemExit as e:  # argparse: --help (0) and usage errors (2)
        code = _exit_code(e.code)
    except BaseException:  # noqa: BLE001 - an unexpected error still gets its traceback and exit 1
        traceback.print_exc()
        code = 1
    exit_without_teardown(code)


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def exit_without_teardown(code: int) -> None:
    """Join threads, run atexit handlers, flush, then `os._exit(code)`."""
    try:
        getattr(threading, "_shutdown")()  # what finalization runs first: thread hooks, then joins
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


if __name__ == "__main__":
    console()
