"""Integrity of written datasets under awkward input: colliding sample keys, malformed metadata,
unsafe split names, and writers whose clocks disagree (issue 17, items 2, 4, 5, 6)."""
from __future__ import annotations

import datetime as dt
import io
import json
import tarfile
import shutil
import threading

import cv2
import pytest

from selfsup.pipeline import manifest, snapshot, storage, writer
from selfsup.pipeline.sources import Item, unique_keys
from selfsup.pipeline.sources.folder import FolderSource
from selfsup.pipeline.tarindex import ShardIndex, index_tar, load_index, scan_shard
from tests.conftest import PHOTOS, run_cli


def photos(n: int) -> list:
    return sorted(PHOTOS.glob("*.jpg"))[:n]


@pytest.fixture
def colliding_folder(tmp_path):
    """`x.jpg` beside `x.png`, `a.b.jpg` beside `a_b.jpg`, and two files whose keys collide with nothing."""
    root = tmp_path / "src"
    root.mkdir()
    src = photos(5)
    shutil.copy(src[0], root / "x.jpg")
    ok, png = cv2.imencode(".png", cv2.imread(str(src[1])))
    assert ok
    (root / "x.png").write_bytes(png.tobytes())
    shutil.copy(src[2], root / "a.b.jpg")
    shutil.copy(src[3], root / "a_b.jpg")
    shutil.copy(src[4], root / "plain.jpg")
    return root


def all_samples(dest: str) -> tuple[list[dict], dict[str, dict[str, bytes]]]:
    """Visible rows and every sample by key; each shard's index agrees with its row and its tar."""
    rows = manifest.read_manifest(dest)
    samples: dict[str, dict[str, bytes]] = {}
    for r in rows:
        scanned = scan_shard(storage.join(dest, r["path"]))
        idx = load_index(storage.join(dest, r["index"]))
        assert len(idx) == r["n_samples"] == len(scanned)
        assert [k for k, _ in scanned] == list(idx.keys)
        for k, m in scanned:
            assert k not in samples, f"key {k} twice in the dataset"
            samples[k] = m
    return rows, samples


# ---------------------------------------------------------------- item 2: sample-key collisions

def test_colliding_keys_get_stable_suffixes_and_every_item_lands(colliding_folder, tmp_path):
    """Adjacent in one shard (no shuffle) is the case that merged two samples into one."""
    dest = str(tmp_path / "ds")
    args = ["shards", "write", str(colliding_folder), dest, "--modality", "image", "--no-shuffle",
            "--samples-per-shard", "100", "--workers", "1", "--quiet"]
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    rows, samples = all_samples(dest)
    assert sum(r["n_samples"] for r in rows) == 5 and len(samples) == 5
    assert "5 samples" in res.stdout and "4 item(s) share a sample key" in res.stdout
    assert "plain" in samples  # an item without a collision keeps its key (and its bytes)
    items, _ = FolderSource(str(colliding_folder), "image").items()
    fixed, report = unique_keys(items)
    assert {it.ref: it.key for it in fixed}["plain.jpg"] == "plain"
    assert sorted(report.renamed) == sorted((it.ref, it.key) for it in fixed if it.ref != "plain.jpg")
    for it in fixed:  # each key holds the bytes of its own file
        members = samples[it.key]
        ext = "png" if it.ref.endswith(".png") else "jpg"
        assert members[ext] == (colliding_folder / it.ref).read_bytes()
    assert run_cli("shards", "verify", dest).returncode == 0
    again = run_cli(*args)  # keys are stable across reruns: the same shard, nothing rewritten
    assert again.returncode == 0 and "0 shard(s) written, 1 already present" in again.stdout


def test_unique_keys_is_deterministic_and_leaves_distinct_keys_alone():
    items = [Item("x", "x.jpg"), Item("y", "y.jpg"), Item("x", "x.png"), Item("a_b", "a.b.jpg"), Item("a_b", "a_b.jpg")]
    fixed, report = unique_keys(items)
    assert [it.key for it in fixed][1] == "y" and len({it.key for it in fixed}) == 5
    assert unique_keys(list(reversed(items)))[0] == list(reversed(fixed))  # order does not matter
    assert not report.rejected and len(report.renamed) == 4
    bad, report = unique_keys([Item("a.b", "a.b.jpg"), Item("ok", "ok.jpg")])
    assert [it.key for it in bad] == ["ok"] and report.rejected[0][0] == "a.b.jpg"


def test_a_shard_whose_index_disagrees_with_its_samples_gets_no_manifest_row(colliding_folder, tmp_path):
    """The writer's own check: two adjacent items with one key (bypassing the planner) never become a row."""
    dest = str(tmp_path / "ds")
    source = FolderSource(str(colliding_folder), "image")
    job = writer.ShardJob(source=source, dest=dest, name="pretrain-test-000000", modality="image",
                          split="pretrain", items=(Item("x", "x.jpg"), Item("x", "x.png")),
                          label_names=(), source_meta={})
    with pytest.raises(AssertionError, match="index holds 1 sample"):
        writer.write_shard(job)
    assert manifest.read_manifest(dest) == []


# ---------------------------------------------------------------- item 4: malformed metadata

@pytest.fixture
def three_shards(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    for p in photos(6):
        shutil.copy(p, root / p.name)
    dest = tmp_path / "ds"
    res = run_cli("shards", "write", str(root), str(dest), "--modality", "image", "--samples-per-shard", "2",
                  "--workers", "1", "--quiet")
    assert res.returncode == 0, res.stderr
    return dest


def test_verify_names_every_malformed_index_and_checks_the_rest(three_shards):
    dest = three_shards
    rows = manifest.read_manifest(str(dest))
    assert len(rows) == 3
    first, second = (dest / rows[0]["index"]), (dest / rows[1]["index"])
    d = json.loads(first.read_text())
    del d["n_samples"]  # a field missing
    first.write_text(json.dumps(d))
    d = json.loads(second.read_text())
    d["members"][0][next(iter(d["members"][0]))][0] = "12"  # an offset of the wrong type
    second.write_text(json.dumps(d))
    res = run_cli("shards", "verify", str(dest), "--json")
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    report = json.loads(res.stdout)
    assert report["shards"] == 3
    problems = {c["shard"]: " ".join(c["problems"]) for c in report["corrupt"]}
    assert set(problems) == {rows[0]["path"], rows[1]["path"]}
    assert "'n_samples' is missing" in problems[rows[0]["path"]]
    assert "offset, size, crc" in problems[rows[1]["path"]]


def test_an_index_whose_sizes_do_not_fit_its_samples_is_refused():
    """Members outside their sample's bytes, or samples overlapping, would steer reads anywhere in the shard."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key in ("a", "b"):
            info = tarfile.TarInfo(f"{key}.wav")
            info.size = 600
            tar.addfile(info, io.BytesIO(bytes(600)))
    good = json.loads(index_tar(io.BytesIO(buf.getvalue()), "s.tar").to_json())
    assert len(ShardIndex.from_json(json.dumps(good))) == 2
    huge = json.loads(json.dumps(good))
    huge["members"][1]["wav"][1] = 10**13  # its sample still ends after 1.5 KB
    with pytest.raises(ValueError, match=r"s.idx is not .*: member b.wav lies outside its sample's bytes "
                                         r"\[1536, 3072\)"):
        ShardIndex.from_json(json.dumps(huge), "s.idx")
    overlap = json.loads(json.dumps(good))
    overlap["ends"][0] = 2048
    with pytest.raises(ValueError, match="samples overlap or are out of order"):
        ShardIndex.from_json(json.dumps(overlap), "s.idx")


def test_an_empty_manifest_part_is_named_and_the_rest_listed(three_shards):
    dest = three_shards
    bad = dest / "_manifest" / "part-00000000zzzz.parquet"
    bad.write_bytes(b"")
    ls = run_cli("shards", "ls", str(dest), "--json")
    assert ls.returncode == 0, ls.stderr
    assert bad.name in ls.stderr and "empty file" in ls.stderr
    listed = json.loads(ls.stdout)
    assert listed["totals"][0]["shards"] == 3 and bad.name in listed["unreadable_parts"][0]["part"]
    verify = run_cli("shards", "verify", str(dest))
    assert verify.returncode == 1
    assert f"CORRUPT _manifest/{bad.name}" in verify.stdout and "4 shard(s) checked, 1 corrupt" in verify.stdout
    with pytest.raises(manifest.ManifestError, match=bad.name):  # a training reader stops, naming it
        manifest.read_manifest(str(dest))


def test_a_location_without_a_dataset_is_an_error_not_an_empty_verdict(three_shards, tmp_path):
    """A typo in the path must not read as "0 shard(s) checked, 0 corrupt" with exit 0."""
    typo = tmp_path / "dataset-typo"
    for action in ("ls", "verify"):
        res = run_cli("shards", action, str(typo))
        assert res.returncode == 2, (action, res.stdout, res.stderr)
        assert f"no dataset at {typo}" in res.stderr and "_manifest/" in res.stderr
        assert "shard(s) checked" not in res.stdout and "verify:" not in res.stderr
    with pytest.raises(FileNotFoundError, match="no dataset at"):
        snapshot.build_snapshot([snapshot.SourceSpec(str(typo))])
    # a dataset whose shards were all retired is still a dataset: empty, not an error
    paths = [r["path"] for r in manifest.read_manifest(str(three_shards))]
    assert run_cli("shards", "rm", str(three_shards), *paths).returncode == 0
    ls = run_cli("shards", "ls", str(three_shards))
    assert ls.returncode == 0 and "no visible shards" in ls.stdout
    verify = run_cli("shards", "verify", str(three_shards))
    assert verify.returncode == 0 and "0 shard(s) checked, 0 corrupt" in verify.stdout


def test_a_manifest_row_pointing_outside_the_dataset_is_refused(three_shards, tmp_path):
    dest = three_shards
    (tmp_path / "secret.tar").write_bytes(b"not yours")
    row = {**manifest.read_manifest(str(dest))[0], "path": "../secret.tar"}
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([row], schema=manifest.SCHEMA), buf)
    (dest / "_manifest" / "part-99999999T000000000000Z-evil.parquet").write_bytes(buf.getvalue())
    with pytest.raises(manifest.ManifestError, match="not a relative path inside the dataset"):
        manifest.read_manifest(str(dest))


# ---------------------------------------------------------------- item 5: names that land in paths

@pytest.mark.parametrize("split", ["../../escaped", "a/b", ".hidden", "two words", ""])
def test_a_split_that_is_not_a_plain_name_is_refused(split, tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    shutil.copy(photos(1)[0], root / "one.jpg")
    dest = tmp_path / "a" / "b" / "ds"
    res = run_cli("shards", "write", str(root), str(dest), "--modality", "image", "--split", split, "--quiet")
    assert res.returncode == 2, res.stdout
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "is not a valid split name" in lines[0], lines
    assert sorted(p.name for p in tmp_path.rglob("*.tar")) == []  # nothing written, inside or out
    with pytest.raises(ValueError, match="not a valid split name"):
        writer.plan_jobs(None, [Item("k", "one.jpg")], [], str(dest), "image", split, 1, {}, 0, False)


# ---------------------------------------------------------------- item 6: order without clocks

@pytest.mark.parametrize("where", ["local", "s3"])
def test_rm_retires_a_shard_even_from_a_client_whose_clock_is_behind(where, tmp_path, moto_s3, monkeypatch):
    dest = str(tmp_path / "ds") if where == "local" else moto_s3.bucket("clock") + "/ds"
    for n in range(2):
        manifest.append_rows(dest, [{"path": f"s-{n}.tar", "index": f"s-{n}.idx", "n_samples": 1}])
    real = manifest.now_utc
    monkeypatch.setattr(manifest, "now_utc", lambda: real() - dt.timedelta(days=1))
    assert manifest.tombstone(dest, ["s-0.tar"]) == 1
    assert [r["path"] for r in manifest.read_manifest(dest)] == ["s-1.tar"]
    manifest.append_rows(dest, [{"path": "s-0.tar", "index": "s-0.idx", "n_samples": 2}])  # written again
    assert [(r["path"], r["n_samples"]) for r in manifest.read_manifest(dest)] == [("s-0.tar", 2), ("s-1.tar", 1)]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_concurrent_appenders_each_get_their_own_part(where, tmp_path, moto_s3):
    dest = str(tmp_path / "ds") if where == "local" else moto_s3.bucket("seq") + "/ds"
    errors: list[BaseException] = []

    def append(w: int) -> None:
        try:
            for i in range(4):
                manifest.append_rows(dest, [{"path": f"w{w}-{i}.tar", "index": f"w{w}-{i}.idx", "n_samples": 1}])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=append, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(manifest.read_manifest(dest)) == 24
    parts = manifest.part_urls(dest)
    assert [p.rsplit("/", 1)[1] for p in parts] == [f"part-{n:012d}.parquet" for n in range(24)]


def test_old_manifests_read_as_before_and_new_rows_follow_them(tmp_path):
    """Parts named by timestamp (older versions) keep their clock order and come before numbered parts."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    dest = str(tmp_path / "ds")
    t0 = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)  # a clock ahead of this test's

    def legacy(name: str, rows: list[dict]) -> None:
        full = [{**manifest._defaults(), **r} for r in rows]
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(full, schema=manifest.SCHEMA), buf)
        storage.write_bytes(storage.join(dest, "_manifest", name), buf.getvalue())

    # listed in name order, the later row first: order is by created_at, as before
    legacy("part-a.parquet", [{"path": "s.tar", "index": "s.idx", "n_samples": 2, "created_at": t0}])
    legacy("part-b.parquet", [{"path": "s.tar", "index": "s.idx", "n_samples": 1,
                               "created_at": t0 - dt.timedelta(hours=1)},
                              {"path": "u.tar", "index": "u.idx", "n_samples": 1, "created_at": t0}])
    assert [(r["path"], r["n_samples"]) for r in manifest.read_manifest(dest)] == [("s.tar", 2), ("u.tar", 1)]
    assert manifest.tombstone(dest, ["u.tar"]) == 1  # our clock is years behind the legacy rows
    assert [r["path"] for r in manifest.read_manifest(dest)] == ["s.tar"]


# ---------------------------------------------------------------- item 1: rerunning after the source changed

def test_a_rerun_after_the_source_changed_writes_exactly_the_new_items(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    pool = photos(12)
    for p in pool[:6]:
        shutil.copy(p, src / p.name)
    dest = str(tmp_path / "ds")
    args = ["shards", "write", str(src), dest, "--modality", "image", "--samples-per-shard", "4", "--workers", "1",
            "--quiet"]
    assert run_cli(*args).returncode == 0
    _, before = all_samples(dest)
    assert len(before) == 6
    edited, removed = pool[0].name, pool[1].name
    (src / edited).write_bytes(pool[8].read_bytes())             # same name, other content
    (src / removed).unlink()
    for p in pool[6:8]:                                          # two new files
        shutil.copy(p, src / p.name)
    ok, png = cv2.imencode(".png", cv2.imread(str(pool[9])))    # a new file whose key the removed one holds
    (src / (pool[1].stem + ".png")).write_bytes(png.tobytes())
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    rows, after = all_samples(dest)                              # no key twice, indexes agree with rows
    assert len(after) == 9 and all(after[k] == m for k, m in before.items())  # nothing rewritten or dropped
    new_bytes = {m.get("jpg", m.get("png")) for k, m in after.items() if k not in before}
    assert new_bytes == {pool[6].read_bytes(), pool[7].read_bytes(), png.tobytes()}
    assert "3 new" in res.stdout and f"changed {edited}" in res.stdout
    assert "1 item(s) in the dataset are no longer in the source (kept)" in res.stdout
    again = run_cli(*args)                                       # nothing left to do
    assert again.returncode == 0 and again.stdout.startswith("0 shard(s) written")
    assert len(all_samples(dest)[1]) == 9
    ls = run_cli("shards", "ls", dest, "--items", "--json")
    held = {i["item"] for i in json.loads(ls.stdout)["items"]}
    assert held == {p.name for p in pool[:8]} | {pool[1].stem + ".png"}
