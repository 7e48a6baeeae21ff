"""BatchMaker's batch arrays: written row by row into preallocated arrays, they hold exactly the bytes
np.stack of the samples gives, quarantine replacements and padding rows included, for every modality;
and the same bytes whether a batch's segments are read one at a time or several at once."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from selfsup.pipeline.batch import BatchMaker, FeedSpec, stack_rows
from selfsup.pipeline.modalities.video import encode_clip_mp4
from selfsup.pipeline.seeding import stable_hash
from selfsup.pipeline.snapshot import SourceSpec, build_snapshot
from tests.conftest import ARGS, FSDD, add_shard, images, texture_clip

WAVE = {"sample_rate": 8000, "seconds": 0.5, "output": "wave"}
SPAN = {"kind": "span", "ratio": 0.5, "mask_length": 2,
        "geometry": {"conv_layers": [[8, 10, 5]] + [[8, 3, 2]] * 4 + [[8, 2, 2]] * 2}}
CLIP = {"frames": 4, "stride": 1, "size": 16}


def media(modality: str, n: int) -> list[tuple[str, dict[str, bytes]]]:
    """n real samples of `modality` and, at position 2, one that cannot decode (quarantined)."""
    if modality == "image":
        good = [(k, m | {"cls": str(i % 3).encode()}) for i, (k, m) in enumerate(images(n, set()))]
    elif modality == "audio":
        good = [(p.stem, {"wav": p.read_bytes()}) for p in sorted(FSDD.glob("*.wav"))[:n]]
    else:
        good = [(f"clip{i}", {"mp4": encode_clip_mp4(texture_clip(6, 32, seed=i), 10)}) for i in range(n)]
    ext = {"image": "jpg", "audio": "wav", "video": "mp4"}[modality]
    return good[:2] + [("broken", {ext: b"not media at all"})] + good[2:]


CASES = {  # modality, samples, batch size, modality args, train, mask, label
    "image-two-views-mask": ("image", 9, 5, ARGS | {"recipe": "simclr"}, True,
                             {"kind": "random", "ratio": 0.5, "geometry": {"patch": 7}}, None),
    "image-eval-padded": ("image", 10, 4, ARGS, False, None, "cls"),
    "audio-wave-eval-padded": ("audio", 6, 3, WAVE, False, SPAN, None),
    "video-two-views": ("video", 3, 2, CLIP | {"output": "two"}, True, None, None),
    "video-eval-padded": ("video", 3, 3, CLIP, False, None, None),
}


def case_spec(case: str, dest: str) -> FeedSpec:
    """One shard of CASES[case]'s samples (one broken) at `dest`, and the FeedSpec of the case over it."""
    modality, n, size, args, train, mask, label = CASES[case]
    add_shard(dest, "pretrain-000000", media(modality, n), modality)
    return FeedSpec(build_snapshot([SourceSpec(url=dest, split="pretrain")]), size, args, seed=5, train=train,
                    mask=mask, label=label)


@pytest.mark.parametrize("case", sorted(CASES))
def test_batch_rows_are_the_bytes_np_stack_gives_with_padding_and_quarantine(case: str, tmp_path: Any) -> None:
    spec = case_spec(case, str(tmp_path / "ds"))
    maker = BatchMaker(spec)
    plan, padded, quarantined = spec.plan(0), 0, 0
    for i in range(plan.num_batches):
        batch = maker.make(0, i)
        expected = reference_rows(maker, batch)
        assert set(expected) <= set(batch)
        for k, want in expected.items():
            got = batch[k]
            assert got.dtype == want.dtype and got.shape == want.shape and got.flags.c_contiguous, k
            assert got.tobytes() == want.tobytes(), (case, i, k)
        padded += int((batch["position"] < 0).sum())
        quarantined += int(batch["quarantined"].sum())
    assert quarantined == 1 and (padded > 0) == (not spec.train)


def reference_rows(maker: BatchMaker, batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """np.stack of each row made on its own: the sample, its replacement if quarantined, or the blank."""
    spec, urls = maker.spec, [s.url for s in maker.spec.snapshot.shards]
    rows = [(urls.index(str(u)), int(p)) for u, p in zip(batch["shard"], batch["position"]) if p >= 0]
    made: list[Any] = []
    for shard, pos in rows:
        key, members = maker.read(shard, pos, pos + 1)[0]
        try:
            made.append(maker.sample(int(batch["epoch"]), shard, key, members, 0))
        except Exception:  # noqa: BLE001 - the broken sample
            made.append(None)
    samples = []
    for j, s in enumerate(made):
        attempt = 0
        while s is None:  # quarantined: the first good stable-hash choice from the same micro-batch
            s = made[stable_hash(spec.seed, int(batch["epoch"]), str(batch["key"][j]), attempt) % len(made)]
            attempt += 1
            assert attempt <= 16
        samples.append(s)
    blank = maker.modality.blank(spec.train) | ({"mask": np.zeros(int(np.prod(maker.grid)), bool)}
                                                if maker.grid else {})
    samples += [blank] * (spec.batch_size - len(rows))
    return {k: np.stack([s[k] for s in samples]) for k in samples[0]}


def test_stack_rows_keeps_np_stack_promotion_and_its_error_for_rows_that_differ() -> None:
    rows = [{"a": np.arange(6, dtype=np.uint8).reshape(2, 3), "n": np.array(j, np.int64)} for j in range(3)]
    out = stack_rows(rows)
    assert out["a"].tobytes() == np.stack([r["a"] for r in rows]).tobytes() and out["n"].tolist() == [0, 1, 2]
    mixed = rows[:2] + [{"a": np.full((2, 3), 300, np.int16), "n": np.array(2, np.int64)}]
    assert stack_rows(mixed)["a"].dtype == np.int16 and stack_rows(mixed)["a"][2, 0, 0] == 300  # not wrapped to uint8
    with pytest.raises(ValueError, match="same shape"):
        stack_rows(rows[:2] + [{"a": np.zeros((3,), np.uint8), "n": np.array(2, np.int64)}])


@pytest.mark.parametrize("case", ["image-two-views-mask", "image-eval-padded", "audio-wave-eval-padded"])
def test_concurrent_segment_reads_make_the_same_batches_as_one_read_at_a_time(case: str, tmp_path: Any) -> None:
    modality, n, _, args, train, mask, label = CASES[case]
    dest, samples = str(tmp_path / "ds"), media(modality, n)
    for k in range(3):  # three shards and batches of 3, so micro-batches span several segments (ranged reads)
        add_shard(dest, f"pretrain-{k:06d}", samples[k::3], modality)
    spec = FeedSpec(build_snapshot([SourceSpec(url=dest, split="pretrain")]), 3, args, seed=5, train=train,
                    mask=mask, label=label, mix=3, run_length=1, read_concurrency=1)
    serial, pooled = BatchMaker(spec), BatchMaker(dataclasses.replace(spec, read_concurrency=4))
    plan, quarantined, padded = spec.plan(0), 0, 0
    assert max(len(plan.batch(i)) for i in range(plan.num_batches)) > 1
    for i in range(plan.num_batches):
        one, four = serial.make(0, i), pooled.make(0, i)
        assert one.keys() == four.keys() and len(one["quarantine"]) == len(four["quarantine"])
        for q1, q4 in zip(one["quarantine"], four["quarantine"]):  # errors may name an object's address
            assert q1 | {"error": q1["error"].split(":")[0]} == q4 | {"error": q4["error"].split(":")[0]}
        for k, v in one.items():
            if isinstance(v, np.ndarray):
                assert v.dtype == four[k].dtype and v.tobytes() == four[k].tobytes(), (case, i, k)
        quarantined += int(one["quarantined"].sum())
        padded += int((one["position"] < 0).sum())
    assert quarantined == 1 and (padded > 0) == (not train) and serial.reads.stats()["max_in_flight"] == 1
