"""`selfsup shards write|ls|verify|rm` on real media, locally and on S3 (moto_server); manifest
appends on S3 and GCS (fake-gcs-server)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import cv2
import pytest
import soundfile

from selfsup.pipeline import manifest, storage, writer
from selfsup.pipeline.sources.folder import FolderSource
from selfsup.pipeline.tarindex import decode_label, load_index, read_samples, scan_shard
from tests.conftest import FMNIST, FSDD, PHOTOS, ROOT, VIDEO, run_cli


@pytest.fixture
def photo_folder(tmp_path):
    """12 real JPEGs in two class folders, plus one corrupt and one truncated file."""
    src = sorted(PHOTOS.glob("*.jpg"))[:12]
    root = tmp_path / "photos"
    for i, p in enumerate(src):
        d = root / ("street" if i % 2 else "square")
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, d / p.name)
    return root, src


def add_bad_files(root):
    (root / "street" / "junk.jpg").write_bytes(os.urandom(5000))
    data = (sorted(PHOTOS.glob("*.jpg"))[20]).read_bytes()
    (root / "square" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    # whole, with a valid header and IEND, but its pixel data zeroed: only decoding the pixels finds it
    ok, png = cv2.imencode(".png", cv2.imread(str(sorted(PHOTOS.glob("*.jpg"))[21])))
    broken = bytearray(png.tobytes())
    broken[len(broken) // 3: len(broken) // 3 + 2000] = bytes(2000)
    (root / "street" / "zeroed.png").write_bytes(bytes(broken))


def read_all(dest):
    """Every sample of every visible shard: by scanning and by indexed ranged reads."""
    rows = manifest.read_manifest(dest)
    scanned, ranged = {}, {}
    for r in rows:
        url = storage.join(dest, r["path"])
        scanned.update(dict(scan_shard(url)))
        idx = load_index(storage.join(dest, r["index"]))
        assert len(idx) == r["n_samples"]
        half = len(idx) // 2
        for lo, hi in ((0, half), (half, len(idx))):
            if hi > lo:
                ranged.update(dict(read_samples(url, idx, lo, hi)))
    return rows, scanned, ranged


@pytest.mark.parametrize("where", ["local", "s3"])
def test_round_trip_folder(where, photo_folder, tmp_path, moto_s3):
    root, src = photo_folder
    dest = str(tmp_path / "ds") if where == "local" else moto_s3.bucket("rt") + "/ds"
    res = run_cli("shards", "write", str(root), dest, "--modality", "image", "--split", "probe-train",
                  "--samples-per-shard", "5", "--quiet")
    assert res.returncode == 0, res.stderr
    assert "3 shard(s) written" in res.stdout and "12 samples" in res.stdout
    rows, scanned, ranged = read_all(dest)
    assert len(rows) == 3 and sum(r["n_samples"] for r in rows) == 12
    assert scanned.keys() == ranged.keys()
    by_name = {p.stem: p for p in src}
    for key, members in scanned.items():
        assert ranged[key] == members
        original = by_name[key.split("_", 1)[1]]
        assert members["jpg"] == original.read_bytes()  # identical bytes
        folder = key.split("_", 1)[0]
        meta = json.loads(members["json"])
        assert meta["label_name"] == folder and meta["path"] == f"{folder}/{original.name}"
        assert decode_label(members["cls"]) == ["square", "street"].index(folder)
    # labels: folder name → sorted class index
    assert {json.loads(m["json"])["label_name"] for m in scanned.values()} == {"square", "street"}
    # shuffled: shard 0 is not simply the first five files in sorted order
    first = sorted(k for k in dict(scan_shard(storage.join(dest, rows[0]["path"]))))
    assert first != sorted(scanned)[:5]
    ls = run_cli("shards", "ls", dest, "--json")
    totals = json.loads(ls.stdout)["totals"]
    assert totals == [{"modality": "image", "split": "probe-train", "shards": 3, "samples": 12,
                       "bytes": sum(r["n_bytes"] for r in rows)}]
    assert run_cli("shards", "verify", dest).returncode == 0


def test_corrupt_inputs_are_skipped_and_listed_or_fatal_with_strict(photo_folder, tmp_path):
    root, _ = photo_folder
    add_bad_files(root)
    dest = str(tmp_path / "ds")
    res = run_cli("shards", "write", str(root), dest, "--modality", "image", "--samples-per-shard", "100", "--quiet")
    assert res.returncode == 0, res.stderr
    assert "3 unreadable source file(s) skipped" in res.stdout
    assert "junk.jpg" in res.stdout and "truncated.jpg" in res.stdout and "truncated JPEG" in res.stdout
    assert "zeroed.png" in res.stdout and "could not decode" in res.stdout
    assert sum(r["n_samples"] for r in manifest.read_manifest(dest)) == 12
    strict = run_cli("shards", "write", str(root), str(tmp_path / "ds2"), "--modality", "image", "--strict", "--quiet")
    assert strict.returncode != 0
    assert manifest.read_manifest(str(tmp_path / "ds2")) == []


def test_a_huge_file_and_an_odd_sample_rate_are_skipped_by_name_without_reading(tmp_path):
    """A 300 MiB (sparse) file is over the default --max-item-bytes; a 500 Hz WAV is outside 1-384 kHz."""
    root = tmp_path / "speech"
    root.mkdir()
    for f in sorted(FSDD.glob("*.wav"))[:3]:
        shutil.copy(f, root / f.name)
    soundfile.write(root / "low_rate.wav", np.zeros(500, np.int16), 500, subtype="PCM_16")
    with open(root / "huge.wav", "wb") as f:
        f.truncate(300 * 2**20)
    source = FolderSource(str(root), "audio")
    items, _ = source.items()
    dest = str(tmp_path / "ds")
    jobs = writer.plan_jobs(source, items, [], dest, "audio", "pretrain", 100, {}, 0, False)
    report = writer.run_jobs(jobs, workers=1)
    skipped = dict(report.skipped)
    assert report.samples == 3 and sorted(skipped) == ["huge.wav", "low_rate.wav"]
    assert "over the limit of 268435456 bytes per item (shards write --max-item-bytes)" in skipped["huge.wav"]
    assert "sample rate 500 Hz is outside 1000-384000 Hz" in skipped["low_rate.wav"]
    assert sum(r["n_samples"] for r in manifest.read_manifest(dest)) == 3


def test_verify_names_a_flipped_byte(photo_folder, tmp_path):
    root, _ = photo_folder
    dest = tmp_path / "ds"
    assert run_cli("shards", "write", str(root), str(dest), "--modality", "image", "--samples-per-shard", "6",
                   "--quiet").returncode == 0
    row = manifest.read_manifest(str(dest))[1]
    idx = load_index(str(dest / row["index"]))
    off, size, _ = idx.members[2]["jpg"]
    path = dest / row["path"]
    data = bytearray(path.read_bytes())
    data[off + size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    res = run_cli("shards", "verify", str(dest))
    assert res.returncode == 1
    assert f"CORRUPT {row['path']}" in res.stdout and f"{idx.keys[2]}.jpg" in res.stdout
    assert "sha256 differs" in res.stdout and "1 corrupt" in res.stdout


def test_two_concurrent_writers_lose_no_row(tmp_path, moto_s3):
    dest = moto_s3.bucket("conc") + "/ds"
    procs = [subprocess.Popen([sys.executable, "-m", "selfsup.jobs.cli", "shards", "write", str(FMNIST), dest,
                               "--modality", "image", "--subset", subset, "--limit", "300",
                               "--samples-per-shard", "20", "--workers", "1", "--quiet"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for subset in ("train", "test")]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    rows = manifest.read_manifest(dest)
    assert len(rows) == 30 and sum(r["n_samples"] for r in rows) == 600
    keys = set()
    for r in rows:
        keys |= set(load_index(storage.join(dest, r["index"])).keys)
    assert len(keys) == 600 and any(k.startswith("fmnist-test") for k in keys)


def test_concurrent_manifest_appends_claim_distinct_parts(object_store):
    """Writers appending manifest rows at once (threads here, processes above) each get a part of their own."""
    dest, opts = object_store.bucket("parts") + "/ds", object_store.options
    writers, per = 4, 4
    barrier, claimed = threading.Barrier(writers), []

    def work(i: int) -> None:
        barrier.wait()
        for j in range(per):
            row = {"path": f"w{i}-{j}.tar", "index": f"w{i}-{j}.idx", "modality": "image", "split": "pretrain",
                   "n_samples": 1, "n_bytes": 1, "sha256": "0" * 64}
            claimed.append(manifest.append_rows(dest, [row], opts))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(claimed)) == writers * per  # no two writers claimed one part
    paths = [r["path"] for r in manifest.read_manifest(dest, opts)]
    assert sorted(paths) == sorted(f"w{i}-{j}.tar" for i in range(writers) for j in range(per))


def test_killed_writer_leaves_nothing_visible_and_rerun_completes(tmp_path):
    dest = tmp_path / "ds"
    args = [sys.executable, "-m", "selfsup.jobs.cli", "shards", "write", str(FMNIST), str(dest), "--modality", "image",
            "--limit", "6000", "--samples-per-shard", "400", "--workers", "1", "--quiet"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((dest / "_manifest").glob("*.parquet"))
                                          if (dest / "_manifest").exists() else []) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    visible = manifest.read_manifest(str(dest))
    assert 2 <= len(visible) < 15, "kill came too late to test anything"
    assert run_cli("shards", "verify", str(dest)).returncode == 0  # no visible partial shard
    mtimes = {r["path"]: (dest / r["path"]).stat().st_mtime_ns for r in visible}
    res = run_cli(*args[3:])
    assert res.returncode == 0, res.stderr
    assert f"{len(visible)} already present" in res.stdout
    rows = manifest.read_manifest(str(dest))
    assert len(rows) == 15 and sum(r["n_samples"] for r in rows) == 6000
    assert all((dest / p).stat().st_mtime_ns == t for p, t in mtimes.items())  # not rewritten
    assert run_cli("shards", "verify", str(dest)).returncode == 0


def test_spoken_digits_keep_label_and_speaker(tmp_path):
    dest = str(tmp_path / "fsdd")
    res = run_cli("shards", "write", str(FSDD), dest, "--modality", "audio", "--split", "probe-test",
                  "--include", "_theo_", "--samples-per-shard", "200", "--quiet")
    assert res.returncode == 0, res.stderr
    rows, scanned, _ = read_all(dest)
    assert sum(r["n_samples"] for r in rows) == 500
    for key, m in scanned.items():
        meta = json.loads(m["json"])
        assert meta["speaker"] == "theo" and decode_label(m["cls"]) == meta["digit"] == int(key[0])
        assert m["wav"] == (FSDD / f"{key}.wav").read_bytes()


def test_pretrain_split_is_unlabeled_and_fmnist_is_png(tmp_path):
    dest = str(tmp_path / "fm")
    assert run_cli("shards", "write", str(FMNIST), dest, "--modality", "image", "--limit", "50",
                   "--quiet").returncode == 0
    _, scanned, _ = read_all(dest)
    assert len(scanned) == 50
    for m in scanned.values():
        assert set(m) == {"png"} and m["png"][:8] == b"\x89PNG\r\n\x1a\n"


def test_video_clips_and_retiring_a_shard(tmp_path):
    dest = str(tmp_path / "vid")
    res = run_cli("shards", "write", str(VIDEO), dest, "--modality", "video", "--samples-per-shard", "1", "--quiet")
    assert res.returncode == 0, res.stderr
    rows, scanned, _ = read_all(dest)
    assert len(rows) == 2
    assert {k: m["avi"] for k, m in scanned.items()} == {
        "tree": (VIDEO / "tree.avi").read_bytes(), "vtest": (VIDEO / "vtest.avi").read_bytes()}
    assert run_cli("shards", "rm", dest, rows[0]["path"]).returncode == 0
    left = manifest.read_manifest(dest)
    assert [r["path"] for r in left] == [rows[1]["path"]]
    assert len(manifest.read_parts(dest)) == 3  # history kept: 2 rows + 1 tombstone


@pytest.mark.parametrize("case,args,message", [
    ("missing source", ["/nonexistent/folder", "{tmp}/d", "--modality", "image"], "source /nonexistent/folder does not exist"),
    ("wrong modality", [str(FSDD), "{tmp}/d", "--modality", "image"], "use --modality audio"),
    ("fmnist as audio", [str(FMNIST), "{tmp}/d", "--modality", "audio"], "use --modality image"),
    ("unwritable dest", [str(FSDD), "/proc/selfsup-no", "--modality", "audio"], "not writable"),
    ("no item size", [str(FSDD), "{tmp}/d", "--modality", "audio", "--max-item-bytes", "0"],
     "--max-item-bytes must be at least 1 byte"),
])
def test_bad_invocations_give_one_clear_line(case, args, message, tmp_path):
    res = run_cli("shards", "write", *[a.format(tmp=tmp_path) for a in args], "--quiet")
    assert res.returncode == 2, (case, res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], lines
