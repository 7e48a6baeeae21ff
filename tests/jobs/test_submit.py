"""`selfsup submit` and `selfsup jobs` against a real cluster from `ray start --head` on 127.0.0.1 with token auth.

The cluster gets its own short temp dir and free ports; teardown kills exactly its processes (found
by that temp dir) rather than `ray stop`, which would stop every Ray on the machine.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from selfsup.jobs.cli import main
from selfsup.trainers import checkpoint as ck
from selfsup.trainers import run_folder as rf
from tests.conftest import FMNIST, ROOT, TRAIN_POLL, Installed, free_port, run_cli

CONFIG = str(ROOT / "jobs" / "configs" / "simclr_image.yaml")
RAY = str(Path(sys.executable).parent / "ray")


class Head:
    """A `ray start --head` cluster: its dashboard address and the environment its clients need."""

    def __init__(self, temp_dir: str, address: str, env: dict[str, str], token_file: str) -> None:
        self.temp_dir, self.address, self.env, self.token_file = temp_dir, address, env, token_file

    def cli(self, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        return run_cli(*args, env={**self.env, **(env or {})}, timeout=timeout)

    def client(self):
        from selfsup.jobs.cluster.jobclient import connect

        return connect(self.address, self.token_file)


def cluster_pids(marker: str) -> set[int]:
    """Processes whose command line or working dir names `marker`, and all their descendants."""
    parents: dict[int, int] = {}
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parents[pid] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if marker in cmd or marker in cwd:
            found.add(pid)
    grew = True
    while grew:
        children = {p for p, pp in parents.items() if pp in found} - found
        grew = bool(children)
        found |= children
    found.discard(os.getpid())
    return found


def kill_cluster(marker: str) -> None:
    """SIGTERM, then SIGKILL, every process of the cluster living under `marker`."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        pids = cluster_pids(marker)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while pids and time.time() < deadline:
            pids = {p for p in pids if Path(f"/proc/{p}").exists() and "zombie" not in _state(p)}
            time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].split("\n", 1)[0].lower()
    except (OSError, IndexError):
        return "zombie"


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    """`ray start --head` on loopback with token auth; server and clients share the token settings."""
    temp_dir = tempfile.mkdtemp(prefix="ssr-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    token_file = os.path.join(temp_dir, "auth_token")
    Path(token_file).write_text(secrets.token_hex(24))
    os.chmod(token_file, 0o600)
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_file, "RAY_USAGE_STATS_ENABLED": "0", **TRAIN_POLL,
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    dash = free_port()
    cmd = [RAY, "start", "--head", "--port", str(free_port()), "--num-cpus", "4", "--node-ip-address", "127.0.0.1",
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--temp-dir", temp_dir,
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
           "--disable-usage-stats"]
    try:
        res = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        yield Head(temp_dir, f"http://127.0.0.1:{dash}", env, token_file)
    finally:
        kill_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def fm(tmp_path_factory) -> str:
    """Fashion-MNIST: 200 pretrain, 200 probe-train, 100 probe-test images."""
    data = str(tmp_path_factory.mktemp("submit") / "fm")
    for split, extra in (("pretrain", ["--limit", "200"]), ("probe-train", ["--limit", "200"]),
                         ("probe-test", ["--subset", "test", "--limit", "100"])):
        assert main(["shards", "write", str(FMNIST), data, "--modality", "image", "--split", split,
                     "--samples-per-shard", "100", "--workers", "1", "--quiet", *extra]) == 0
    return data


def tiny(run: str, data: str) -> list[str]:
    return [f"run={run}", f"data.sources=[{{url: {data}}}]", "train.steps=4", "train.ckpt_every=2",
            "train.warmup_steps=0", "data.batch_size=32", "data.backend=inline", "objective.backbone_args.width=8",
            "scaling.num_workers=1", "cluster.image=registry.example/selfsup:test"]


@pytest.fixture(scope="module")
def submitted(head, fm, tmp_path_factory):
    """`selfsup submit pretrain ... --follow` of a 4-step run (Ray Train inside the job); a secret in the env."""
    folder = tmp_path_factory.mktemp("submitted")
    run, staging = str(folder / "run"), folder / "tmp"
    staging.mkdir()
    res = head.cli("submit", "pretrain", CONFIG, *tiny(run, fm), "--address", head.address, "--follow", "--quiet",
                   env={"AWS_SECRET_ACCESS_KEY": "sekrit-never-shipped", "TMPDIR": str(staging)})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return run, res, staging


@pytest.mark.e2e
def test_submit_pretrain_runs_to_completion_and_jobs_ls_shows_it(head, submitted):
    run, res, staging = submitted
    job_id = res.stdout.splitlines()[0]
    assert job_id.startswith("selfsup-pretrain-")
    assert "finished 4 steps" in res.stdout  # --follow streamed the job's log
    assert [s for s, _ in ck.list_checkpoints(run)] == [2, 4]
    assert rf.run_state(run) == rf.FINISHED
    assert not list(staging.glob("selfsup-submit-*"))  # the staged working_dir lived only for the upload

    info = head.client().get_job_info(job_id)
    shipped = json.dumps({"runtime_env": info.runtime_env, "metadata": info.metadata, "entrypoint": info.entrypoint})
    assert "sekrit" not in shipped and head.env["RAY_AUTH_TOKEN_PATH"] not in shipped
    assert info.metadata["image"] == "registry.example/selfsup:test"
    assert info.metadata["selfsup_command"] == "pretrain" and info.metadata["target"] == run
    assert set(info.runtime_env["env_vars"]) <= {"RAY_USAGE_STATS_ENABLED", "PYTHONUNBUFFERED"}
    assert "pip" not in info.runtime_env and "__pycache__" in info.runtime_env["excludes"]
    assert info.entrypoint.endswith(" pretrain config.yaml --quiet"), info.entrypoint

    ls = head.cli("jobs", "ls", "--address", head.address)
    assert ls.returncode == 0, ls.stderr
    print(ls.stdout)
    line = next(ln for ln in ls.stdout.splitlines() if ln.startswith(job_id))
    assert "SUCCEEDED" in line and "pretrain" in line and run in line
    logs = head.cli("jobs", "logs", job_id, "--address", head.address)
    assert logs.returncode == 0 and "finished 4 steps" in logs.stdout
    # the Ray Train worker's own lines are in the job's log, named by their process
    worker = [ln for ln in logs.stdout.splitlines() if "rank 0 of 1: training from step 0 to 4" in ln]
    assert worker and "RayTrainWorker" in worker[0], logs.stdout[-3000:]


@pytest.mark.e2e
def test_submitted_evaluation_is_its_own_job(head, submitted, fm):
    run, _, _ = submitted
    res = head.cli("submit", "evaluate", run, "--eval-set", f"fm={fm}", "--methods", "knn", "--no-ray", "--quiet",
                   "--address", head.address, "--follow")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.split()[0].startswith("selfsup-evaluate-")
    from selfsup.jobs.evaluation.results import read_results

    rows = read_results(run).to_pylist()
    assert {(r["encoder"], r["step"]) for r in rows} >= {("pretrained", 4), ("random_init", -1)}


def test_jobs_stop_and_token_errors(head, fm, tmp_path):
    never = str(tmp_path / "never-trained")  # --watch waits for a run that never starts
    res = head.cli("submit", "evaluate", never, "--watch", "--poll", "1", "--eval-set", f"fm={fm}", "--no-ray",
                   "--address", head.address)
    assert res.returncode == 0, res.stderr[-3000:]
    job_id = res.stdout.split()[0]
    stop = head.cli("jobs", "stop", job_id, "--address", head.address)
    assert stop.returncode == 0 and "STOPPED" in stop.stdout, stop.stdout + stop.stderr
    assert head.cli("jobs", "logs", "no-such-job", "--address", head.address).returncode == 2

    no_token = head.cli("jobs", "ls", "--address", head.address, env={"RAY_AUTH_MODE": "disabled"})
    assert no_token.returncode == 2 and "demands a token" in no_token.stderr, no_token.stderr
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token")
    bad = head.cli("jobs", "ls", "--address", head.address, "--auth-token-file", str(wrong))
    assert bad.returncode == 2 and "rejected the token" in bad.stderr, bad.stderr


def test_submit_refuses_credentials_and_bad_arguments_before_submitting(fm, tmp_path, capsys):
    from selfsup.jobs.cluster.submit import plan_job, watch_args
    from selfsup.pipeline.config import to_yaml

    job = plan_job("retrain", CONFIG, [f"run={tmp_path}/runs", f"data.sources=[{{url: {fm}}}]", "--min-new-samples",
                                       "50", "retrain.tolerance=0.01"])
    assert job["argv"] == ["retrain", "<config>", "--min-new-samples", "50"]
    assert job["config"].retrain.tolerance == 0.01 and job["run"] == f"{tmp_path}/runs"
    rel = plan_job("pretrain", CONFIG, ["run=runs/x", "data.sources=[{url: data/fm}]"])
    assert rel["config"].run == os.path.abspath("runs/x")
    assert rel["config"].data.sources[0].url == os.path.abspath("data/fm")
    beside = plan_job("evaluate", f"{tmp_path}/runs/x", watch_args("fm=data/fm"))  # what --with-eval submits
    assert beside["argv"] == ["evaluate", f"{tmp_path}/runs/x", "--watch", "--poll", "2", "--eval-set",
                              f"fm={os.path.abspath('data/fm')}", "--quiet"]
    with pytest.raises(ValueError, match="cluster.env names credentials"):
        plan_job("pretrain", CONFIG, ["cluster.env={AWS_SECRET_ACCESS_KEY: x}"])
    named = plan_job("pretrain", "simclr_image", ["run=runs/x", "--storage-option", "endpoint_url=http://m:9",
                                                  "--storage-option=secret=sekrit", "--stop-after", "5"])
    assert named["argv"] == ["pretrain", "<config>", "--stop-after", "5"]  # a job's argv is public: options go
    shipped = to_yaml(named["config"])                                   # into the config, credentials stripped
    assert "endpoint_url: http://m:9" in shipped and "sekrit" not in shipped
    evaluate = plan_job("evaluate", f"{tmp_path}/runs/x", ["--eval-set", "fm=data/fm", "--storage-option",
                                                          "endpoint_url=http://m:9", "--storage-option=secret=sekrit"])
    assert evaluate["argv"] == ["evaluate", f"{tmp_path}/runs/x", "--eval-set", f"fm={os.path.abspath('data/fm')}",
                                "--storage-option", "endpoint_url=http://m:9"]  # no config: the endpoint rides argv
    assert "not forwarding --storage-option secret" in capsys.readouterr().err
    res = run_cli("submit", "pretrain", CONFIG, "train.nonsense=1", "--address", "http://127.0.0.1:9")
    assert res.returncode == 2 and "train.nonsense" in res.stderr


def test_the_working_dir_holds_the_config_and_from_a_checkout_its_packages_as_installed(fm, tmp_path):
    """From a checkout the staged packages import on their own (no editable install: -S skips its .pth);
    from an installed selfsup only the config is shipped."""
    import sysconfig

    from selfsup.jobs.cluster.submit import checkout_root, plan_job, stage_working_dir

    job = plan_job("pretrain", CONFIG, tiny(str(tmp_path / "run"), fm) + ["storage.secret_access_key=sekrit"])
    assert checkout_root() == ROOT
    source, alone = tmp_path / "checkout", tmp_path / "installed"
    source.mkdir(), alone.mkdir()
    stage_working_dir(source, job["config"], ROOT)
    stage_working_dir(alone, job["config"], None)
    assert [p.name for p in alone.iterdir()] == ["config.yaml"]
    shipped_config = (alone / "config.yaml").read_text()
    assert "sekrit" not in shipped_config and "registry.example" in shipped_config
    shipped = {str(p.relative_to(source)) for p in source.rglob("*") if p.is_file()}
    assert {"config.yaml", "selfsup/__init__.py", "selfsup/jobs/cli.py", "selfsup/pipeline/modalities/__init__.py",
            "selfsup/trainers/objectives/__init__.py", "selfsup/jobs/configs/simclr_image.yaml"} <= shipped
    assert not {p.split("/")[0] for p in shipped} - {"config.yaml", "selfsup"}  # no tests/, docs/, .venv/ ...
    code = ("import selfsup.jobs.cli, selfsup.pipeline.modalities, selfsup.trainers.objectives; "
            "print(selfsup.jobs.cli.__file__)")
    res = subprocess.run([sys.executable, "-S", "-c", code], cwd=source, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]})
    assert res.returncode == 0, res.stderr[-3000:]
    assert Path(res.stdout.strip()) == source / "selfsup" / "jobs" / "cli.py"


def test_submit_from_an_installed_selfsup_ships_only_the_config(head, fm, installed: Installed, tmp_path):
    """`selfsup submit` of the installed copy, away from the checkout, with a config of its package data;
    the image (here the cluster's own environment) provides selfsup."""
    run = str(tmp_path / "run")
    config = str(installed.site / "selfsup" / "jobs" / "configs" / "simclr_image.yaml")
    args = [*tiny(run, fm), "train.steps=2", "--no-ray", "--quiet", "--address", head.address, "--follow"]
    res = installed.run("-m", "selfsup.jobs.cli", "submit", "pretrain", config, *args, cwd=tmp_path, env=head.env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "selfsup is installed here, not run from a checkout" in res.stderr
    assert "registry.example/selfsup:test" in res.stderr
    assert "finished 2 steps" in res.stdout
    assert [s for s, _ in ck.list_checkpoints(run)] == [2]
    info = head.client().get_job_info(res.stdout.splitlines()[0])
    assert info.entrypoint.endswith(" pretrain config.yaml --no-ray --quiet"), info.entrypoint
    assert info.runtime_env["working_dir"].startswith("gcs://")
