"""`selfsup shards add`: third-party WebDataset tars (written by webdataset's own ShardWriter) added in
place on local disk and S3, verified, trained on; bad tars refused by name; external manifest rows
kept safe; and `tar_urls` for Ray Data."""
from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import pytest

import selfsup
from selfsup.jobs.cli import main
from selfsup.pipeline import manifest, storage
from selfsup.pipeline.snapshot import SourceSpec, build_snapshot
from selfsup.pipeline.tarindex import read_samples, load_index
from selfsup.trainers import run_folder as rf
from tests.conftest import PHOTOS, ROOT, add_shard, pretrain_overrides

CONFIG = str(ROOT / "jobs" / "configs" / "simclr_image.yaml")
N = 32  # photos in the set, 8 per tar


@pytest.fixture(scope="module")
def wds_set(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """4 tars by webdataset.ShardWriter: 32 real photos (.jpg) with a .cls and a .json each."""
    import webdataset as wds

    folder = tmp_path_factory.mktemp("wds")
    photos = sorted(PHOTOS.glob("*.jpg"))[:N]
    with wds.ShardWriter(str(folder / "laion-%06d.tar"), maxcount=8, verbose=0) as sink:
        for i, p in enumerate(photos):
            sink.write({"__key__": f"{i:09d}", "jpg": p.read_bytes(), "cls": i % 3, "json": {"file": p.name}})
    tars = sorted(folder.glob("*.tar"))
    assert len(tars) == 4
    return {"tars": tars, "jpg": {f"{i:09d}": p.read_bytes() for i, p in enumerate(photos)}}


def copy_tars(tars: list[Path], folder: Path) -> Path:
    folder.mkdir(parents=True)
    for t in tars:
        shutil.copy(t, folder / t.name)
    return folder


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def samples_of(dataset: str) -> dict[str, dict[str, bytes]]:
    """key → members of every sample, read back through the manifest and the indexes (ranged reads)."""
    out = {}
    for ref in build_snapshot([SourceSpec(dataset)], "image").shards:
        index = load_index(ref.index_url)
        out.update(dict(read_samples(ref.url, index, 0, len(index))))
    return out


def test_added_local_tars_are_read_in_place_and_adding_them_again_adds_nothing(wds_set, tmp_path, capsys):
    src = copy_tars(wds_set["tars"], tmp_path / "src")
    before = {t.name: sha(t) for t in src.glob("*.tar")}
    dest = str(tmp_path / "ds")
    assert main(["shards", "add", f"{src}/*.tar", dest, "--modality", "image", "--quiet"]) == 0
    assert "4 shard(s) added (32 samples), 0 already present, 0 refused" in capsys.readouterr().out
    rows = manifest.read_manifest(dest)
    assert [r["path"] for r in rows] == [str(src / n) for n in sorted(before)] and all(r["external"] for r in rows)
    assert [r["index"] for r in rows] == [str(src / n.replace(".tar", ".idx")) for n in sorted(before)]
    assert {t.name: sha(t) for t in src.glob("*.tar")} == before  # read in place, never rewritten
    got = samples_of(dest)
    assert {k: m["jpg"] for k, m in got.items()} == wds_set["jpg"]
    assert all(set(m) == {"jpg", "cls", "json"} for m in got.values())  # kept as they are; training ignores them
    assert main(["shards", "verify", dest]) == 0

    parts = manifest.part_urls(dest)
    assert main(["shards", "add", str(src), dest, "--modality", "image", "--quiet"]) == 0  # the folder: same tars
    assert "0 shard(s) added (0 samples), 4 already present" in capsys.readouterr().out
    assert manifest.part_urls(dest) == parts and len(manifest.read_manifest(dest)) == 4

    first = sorted(src.glob("*.tar"))[0]
    first.write_bytes(first.read_bytes()[:-1024])  # changed after it was added: listed, not added again
    assert main(["shards", "add", str(first), dest, "--modality", "image", "--quiet"]) == 0
    assert f"changed {first}: its size differs" in capsys.readouterr().out
    assert main(["shards", "rm", dest, str(first)]) == 0  # retired like any shard, by the path `ls` shows
    assert len(manifest.read_manifest(dest)) == 3


@pytest.mark.e2e
def test_added_s3_tars_verify_and_train_on_two_workers(ray_cluster, moto_s3, wds_set, tmp_path, capsys):
    src = moto_s3.bucket("laion") + "/shards"
    for t in wds_set["tars"]:
        storage.upload_file(str(t), storage.join(src, t.name))
    foreign = storage.join(src, "laion-000001.idx")  # someone else's file where our index would go: left alone
    storage.write_text(foreign, "not ours")
    dest = moto_s3.bucket("ds") + "/laion"
    assert main(["shards", "add", f"{src}/*.tar", dest, "--modality", "image", "--quiet"]) == 0
    assert "4 shard(s) added (32 samples)" in capsys.readouterr().out
    indexes = [r["index"] for r in manifest.read_manifest(dest)]
    assert indexes[0] == storage.join(src, "laion-000000.idx") and indexes[1].startswith("_external/laion-000001-")
    assert storage.read_text(foreign) == "not ours"
    assert main(["shards", "verify", dest]) == 0

    run = str(tmp_path / "run")
    args = pretrain_overrides(run, dest, 2, **{"data.batch_size": 8, "data.backend": "inline"})
    assert main(["pretrain", CONFIG, *args, "--quiet"]) == 0
    assert rf.read_status(run).state == rf.FINISHED
    assert [m["step"] for m in rf.read_metrics(run)] == [1, 2]


def bad_tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_compressed_and_mixed_tars_are_refused_naming_each(wds_set, tmp_path, capsys):
    src = copy_tars(wds_set["tars"][:1], tmp_path / "src")
    good = src / wds_set["tars"][0].name
    jpg = next(iter(wds_set["jpg"].values()))
    (src / "gz.tar.gz").write_bytes(gzip.compress(good.read_bytes()))
    (src / "sneaky.tar").write_bytes(gzip.compress(good.read_bytes()))
    (src / "interleaved.tar").write_bytes(bad_tar([("a.jpg", jpg), ("b.jpg", jpg), ("a.json", b"{}")]))
    (src / "nomedia.tar").write_bytes(bad_tar([("a.jpg", jpg), ("b.json", b"{}")]))
    dest = str(tmp_path / "ds")
    assert main(["shards", "add", str(src), dest, "--modality", "image", "--index-in-dest", "--quiet"]) == 2
    captured = capsys.readouterr()
    assert "1 shard(s) added (8 samples), 0 already present, 4 refused" in captured.out
    err = captured.err
    assert f"{src / 'gz.tar.gz'} is a compressed tar" in err
    assert f"{src / 'sneaky.tar'} is gzip-compressed despite its .tar name" in err
    assert f"{src / 'interleaved.tar'}: mixed keys" in err
    assert f"{src / 'nomedia.tar'}: sample 'b' has members ['json'] but no image member" in err
    assert [r["path"] for r in manifest.read_manifest(dest)] == [str(good)]
    assert sorted(p.name for p in src.iterdir() if p.suffix == ".idx") == []  # --index-in-dest: source untouched
    assert main(["shards", "add", str(good), dest, "--modality", "audio", "--split", "other", "--quiet"]) == 0
    assert "0 shard(s) added" in capsys.readouterr().out  # a tar already in the dataset is never added twice


@pytest.mark.parametrize("path", [
    "../x.tar", "s3://b/../x.tar", "s3://user:pw@b/x.tar", "file://rel/x.tar", "simplecache::s3://b/x.tar",
    "pipe:curl http://h/x.tar", "http://h/x.tar", "s3://b/x.tar?versionId=1", "relative/x.tar", "/a//x.tar"])
def test_an_external_row_must_name_a_plain_absolute_url(path, tmp_path):
    with pytest.raises(ValueError, match="neither a plain absolute URL"):
        manifest.append_rows(str(tmp_path), [{"path": path, "index": "_external/x.idx", "external": True}])


def test_only_external_rows_may_leave_the_dataset(tmp_path):
    for path in ("s3://b/x.tar", "/abs/x.tar", "file:///abs/x.tar", "gs://b/d/x.tar"):
        manifest.append_rows(str(tmp_path), [{"path": path, "index": "_external/x.idx", "external": True}])
        with pytest.raises(ValueError, match="not a relative path inside the dataset"):
            manifest.append_rows(str(tmp_path), [{"path": path, "index": "x.idx"}])
    row = {"path": "/abs/x.tar", "index": "_external/x.idx", "external": True}
    assert manifest.locate("s3://d/ds", row) == "/abs/x.tar"
    assert manifest.locate("s3://d/ds", row, "index") == "s3://d/ds/_external/x.idx"


def test_a_part_written_before_the_external_column_reads_as_before(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    old = pa.schema([f for f in manifest.SCHEMA if f.name != "external"])
    row = {**manifest._defaults(), "path": "s.tar", "index": "s.idx", "n_samples": 3}
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{k: row[k] for k in old.names}], schema=old), buf)
    storage.write_bytes(storage.join(str(tmp_path), "_manifest", "part-000000000000.parquet"), buf.getvalue())
    (got,) = manifest.read_manifest(str(tmp_path))
    assert (got["path"], got["n_samples"], got["external"]) == ("s.tar", 3, False)


def test_ray_data_reads_every_sample_of_a_split_once_from_tar_urls(ray_cluster, wds_set, tmp_path):
    """A dataset written by selfsup (tars with .idx beside) plus an added tar: `tar_urls` gives Ray Data
    the tars only, and read_webdataset yields every sample once."""
    import ray.data

    dest = str(tmp_path / "ds")
    jpgs = list(wds_set["jpg"].items())
    for n in range(2):
        add_shard(dest, f"pretrain-{n}", [(f"w{k}", {"jpg": v}) for k, v in jpgs[n * 4: n * 4 + 4]], "image")
    add_shard(dest, "probe-0", [("probe", {"jpg": jpgs[0][1], "cls": b"1"})], "image", split="probe-train")
    assert main(["shards", "add", str(wds_set["tars"][0]), dest, "--modality", "image", "--index-in-dest",
                 "--quiet"]) == 0
    assert main(["shards", "add", dest, dest, "--modality", "image", "--quiet"]) == 0  # its own tars: present
    urls = selfsup.tar_urls(dest, "pretrain")
    assert len(urls) == 3 and all(u.endswith(".tar") for u in urls)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    keys = [r["__key__"] for r in ray.data.read_webdataset(urls, decoder=None).take_all()]
    assert sorted(keys) == sorted([f"w{k}" for k, _ in jpgs[:8]] + [k for k, _ in jpgs[:8]])
    with pytest.raises(ValueError, match="no visible shards with split 'nope'"):
        selfsup.tar_urls(dest, "nope")
