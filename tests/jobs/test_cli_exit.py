"""The console script's exit: it skips native teardown but keeps what finalization does for Python."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import ROOT

PROGRAM = textwrap.dedent("""
    import atexit, sys, threading, time
    from concurrent.futures import ThreadPoolExecutor
    from selfsup.jobs.cli import console

    atexit.register(lambda: print("atexit handler ran", flush=True))
    pool = ThreadPoolExecutor(1)  # never shut down: finalization's thread hooks must still end it
    pool.submit(time.sleep, 0.05)
    done = []
    threading.Thread(target=lambda: (time.sleep(0.2), done.append(1), print("thread finished"))).start()
    sys.stdout.write("unflushed tail")  # no newline, no flush: the exit must flush it
    sys.argv = ["selfsup", *sys.argv[1:]]
    console()
    print("never reached")
""")


def run_console(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROGRAM, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_a_command_error_keeps_its_exit_code_and_python_teardown_still_runs(tmp_path):
    res = run_console("shards", "verify", str(tmp_path / "no-such-dataset"))
    assert res.returncode == 2, res.stderr
    assert "selfsup shards: error:" in res.stderr and "no-such-dataset" in res.stderr
    assert "unflushed tail" in res.stdout and "thread finished" in res.stdout
    assert res.stdout.index("thread finished") < res.stdout.index("atexit handler ran")  # threads join first
    assert "never reached" not in res.stdout


def test_help_exits_zero_and_a_usage_error_exits_two():
    ok = run_console("--help")
    assert ok.returncode == 0 and "usage: selfsup" in ok.stdout and "atexit handler ran" in ok.stdout
    bad = run_console("no-such-command")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_an_unexpected_error_prints_its_traceback_and_exits_one():
    program = PROGRAM.replace("console()", "import selfsup.jobs.cli as c; c.main = lambda: 1 / 0; console()")
    res = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 1
    assert "ZeroDivisionError" in res.stderr and "Traceback" in res.stderr
    assert "atexit handler ran" in res.stdout
