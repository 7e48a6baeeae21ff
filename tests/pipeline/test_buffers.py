"""Large members as views of the shard (pipeline/buffers.py, storage.read_view): the same batches as
copied bytes, only the part a clip decodes is read, and no mapping outlives the batch."""
from __future__ import annotations

import dataclasses
import gc
import io
import os
from typing import Any

import numpy as np
import pytest

from selfsup.pipeline import batch as batch_module
from selfsup.pipeline import storage
from selfsup.pipeline.batch import BatchMaker
from selfsup.pipeline.buffers import BufferFile, buffer_file
from selfsup.pipeline.modalities import video as video_module
from selfsup.pipeline.tarindex import load_index, members_from_range
from tests.conftest import VIDEO, add_shard
from tests.pipeline.test_batch import case_spec


def test_buffer_file_reads_and_seeks_as_bytesio_does() -> None:
    data = bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8))
    view = memoryview(data)[100:4100]
    ours, ref = BufferFile(view), io.BytesIO(bytes(view))
    rng = np.random.default_rng(1)
    for _ in range(300):
        op = rng.integers(0, 4)
        if op == 0:
            n = int(rng.integers(-1, 700))
            assert ours.read(n) == ref.read(n)
        elif op == 1:
            whence = int(rng.integers(0, 3))
            offset = int(rng.integers(0, 4500)) - (4000 if whence == 2 else 0) - (ref.tell() if whence == 1 else 0)
            assert ours.seek(offset, whence) == ref.seek(offset, whence)
        elif op == 2:
            a = bytearray(int(rng.integers(0, 600)))
            b = bytearray(len(a))
            assert ours.readinto(a) == ref.readinto(b) and a == b
        assert ours.tell() == ref.tell()
    with pytest.raises(ValueError, match="negative seek"):
        ours.seek(-1)
    ours.close()
    with pytest.raises(ValueError):
        ours.read(1)
    assert isinstance(buffer_file(b"abc"), io.BytesIO) and isinstance(buffer_file(memoryview(b"abc")), BufferFile)


@pytest.mark.parametrize("start", [0, 1, 4095, 4096, 70_001])
def test_read_view_maps_the_same_bytes_as_a_read(start: int, tmp_path: Any) -> None:
    path = tmp_path / "blob"
    path.write_bytes(bytes(np.random.default_rng(start).integers(0, 256, 200_000, np.uint8)))
    for end in (start, start + 1, start + 5000, 200_000):
        view = storage.read_view(str(path), start, end)
        assert isinstance(view, memoryview) and view.readonly
        assert view.tobytes() == storage.read_bytes(str(path), start, end)
    with pytest.raises(OSError, match="runs past the end"):
        storage.read_view(str(path), start, 200_001)


def test_members_from_range_views_only_members_as_large_as_asked(tmp_path: Any) -> None:
    dest = str(tmp_path / "ds")
    samples = [("a", {"mp4": b"x" * 3000, "json": b'{"k": 1}'}), ("b", {"mp4": b"y" * 10, "cls": b"2"})]
    add_shard(dest, "pretrain-000000", samples, "video")
    idx = load_index(os.path.join(dest, "pretrain-000000.idx"))
    start, end = idx.span(0, 2)
    data = storage.read_bytes(os.path.join(dest, "pretrain-000000.tar"), start, end)
    plain = members_from_range(idx, 0, 2, data)
    viewed = members_from_range(idx, 0, 2, data, views_from=1000)
    assert [k for k, _ in plain] == [k for k, _ in viewed] == ["a", "b"]
    for (_, p), (_, v) in zip(plain, viewed):
        assert p.keys() == v.keys() and all(type(m) is bytes for m in p.values())
        for ext in p:
            assert bytes(v[ext]) == p[ext]
            assert isinstance(v[ext], memoryview) == (len(p[ext]) >= 1000), ext


def shard_mappings(dest: str) -> list[str]:
    """Lines of /proc/self/maps that map a file under `dest`."""
    with open("/proc/self/maps") as f:
        return [line for line in f if dest in line]


@pytest.mark.parametrize("case", ["image-two-views-mask", "image-eval-padded", "video-two-views", "video-eval-padded"])
def test_members_read_as_views_make_the_same_batches_as_copies(case: str, tmp_path: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    dest = str(tmp_path / "ds")
    spec = case_spec(case, dest)
    copies = BatchMaker(spec)
    copies.member_views = False
    viewed = BatchMaker(dataclasses.replace(spec))
    assert viewed.member_views  # image and video take views
    maps: list[int] = []
    real_view = storage.read_view

    def read_view(*a: Any, **k: Any) -> memoryview:
        maps.append(1)
        return real_view(*a, **k)

    monkeypatch.setattr(batch_module, "MEMBER_VIEW_BYTES", 1)  # every member a view (the samples here are small)
    monkeypatch.setattr(storage, "read_view", read_view)
    plan = spec.plan(0)
    for i in range(plan.num_batches):
        a, b = copies.make(0, i), viewed.make(0, i)
        assert a.keys() == b.keys() and [q["key"] for q in a["quarantine"]] == [q["key"] for q in b["quarantine"]]
        for k, v in a.items():
            if isinstance(v, np.ndarray):
                assert v.dtype == b[k].dtype and v.tobytes() == b[k].tobytes(), (case, i, k)
    assert len(maps) == viewed.reads.reads > 0 and copies.reads.reads == viewed.reads.reads
    del a, b
    gc.collect()
    assert shard_mappings(dest) == []  # every mapping went with the batch that read it


def test_a_clip_reads_only_the_part_of_a_viewed_member_it_decodes(monkeypatch: pytest.MonkeyPatch) -> None:
    data = (VIDEO / "vtest.avi").read_bytes()
    clip = video_module.VideoModality(frames=4, stride=1, size=32, output="single")
    read = []

    class Counting(BufferFile):
        def read(self, size: int | None = -1) -> bytes:
            out = super().read(size)
            read.append(len(out))
            return out

    monkeypatch.setattr(video_module, "buffer_file", Counting)
    info = clip.decode({"avi": memoryview(data)})
    probed, read[:] = sum(read), []
    clips = 0
    for seed in range(3):
        out = clip.sample(info, np.random.default_rng(seed), True)
        assert out["video"].shape == (4, 32, 32, 3)
        assert sum(read) < len(data) / 2, (seed, sum(read), len(data))  # seeks: not the whole file
        clips += sum(read)
        read[:] = []
    assert probed < len(data) / 2
    assert probed > 0 and clips > 0  # the decoder reads through the counted file: the bounds above are not vacuous


def test_labels_read_from_viewed_metadata_members() -> None:
    from selfsup.pipeline.batch import label_of

    # a .json or .cls of MEMBER_VIEW_BYTES or more arrives as a view: json.loads would refuse it and the row go unlabeled
    assert label_of({"json": memoryview(b'{"digit": 3}')}, "digit") == 3
    assert label_of({"cls": memoryview(b"7")}, "cls") == 7
