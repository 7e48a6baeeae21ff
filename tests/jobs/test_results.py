"""The evaluation results store: keys, idempotent appends, concurrent appenders, the accuracy query."""
from __future__ import annotations

import multiprocessing
import threading

import pytest

from selfsup.jobs.evaluation import results


def row(ckpt: str, encoder: str = "pretrained", method: str = "knn", acc: float = 0.5, arch: str = "a1",
        eval_set: str = "fm") -> dict:
    step = int(ckpt.rsplit("-", 1)[-1]) if encoder == "pretrained" else -1
    return {"checkpoint": ckpt if encoder == "pretrained" else "", "step": step, "eval_set": eval_set,
            "target": "cls", "method": method, "encoder": encoder, "accuracy": acc, "n_train": 300,
            "n_test": 200, "seconds": 0.1, "arch": arch, "time": 1.0}


def test_append_is_idempotent_by_key_and_baselines_are_keyed_by_architecture(tmp_path):
    for run in (str(tmp_path / "run"), "memory://results-store/run"):
        assert results.read_results(run) is None and results.read_rows(run) == []
        first = [row("c/step-2"), row("", "random_init"), row("", "raw")]
        assert results.append_results(run, first) == 3
        again = [row("c/step-2", acc=0.9), row("", "random_init", acc=0.9), row("c/step-4")]
        assert results.append_results(run, again) == 1  # only step 4 is new
        assert results.append_results(run, [row("", "random_init", arch="a2")]) == 1  # another architecture
        rows = results.read_rows(run)
        assert len(rows) == 5 and tuple(rows[0]) == results.COLUMNS
        assert results.existing_keys(run) == {results.result_key(r) for r in rows}
        assert results.accuracy(run, "fm", "cls", "knn", "pretrained", "c/step-2") == 0.5  # the first stays


def test_accuracy_query(tmp_path):
    run = str(tmp_path / "run")
    results.append_results(run, [row("c/step-2", acc=0.6), row("c/step-4", acc=0.7), row("", "random_init", acc=0.2),
                                 row("c/step-4", method="linear", acc=0.8)])
    assert results.accuracy(run, "fm", "cls", "knn", "pretrained", "c/step-4") == 0.7
    assert results.accuracy(run, "fm", "cls", "linear", "pretrained", "c/step-4") == 0.8
    assert results.accuracy(run, "fm", "cls", "knn", "random_init") == 0.2
    with pytest.raises(ValueError, match="no pretrained knn result for other/cls"):
        results.accuracy(run, "other", "cls", "knn", "pretrained", "c/step-4")
    with pytest.raises(ValueError, match="valid encoders are pretrained, random_init, raw"):
        results.accuracy(run, "fm", "cls", "knn", "random")
    with pytest.raises(ValueError, match="lack columns"):
        results.append_results(run, [{"checkpoint": "x", "encoder": "pretrained"}])


def _append_many(run: str, writer: int, n: int) -> None:
    for i in range(n):
        results.append_results(run, [row(f"w{writer}/step-{i}"), row(f"w{writer}/step-{i}", method="linear")])


def test_two_concurrent_appenders_lose_no_rows(tmp_path, moto_s3):
    n = 12
    ctx = multiprocessing.get_context("spawn")
    run = str(tmp_path / "run")
    procs = [ctx.Process(target=_append_many, args=(run, w, n)) for w in (0, 1)]  # two processes, one folder
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    s3_run = moto_s3.bucket("results") + "/run"
    threads = [threading.Thread(target=_append_many, args=(s3_run, w, n)) for w in (0, 1)]  # ETag-conditional
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for where in (run, s3_run):
        rows = results.read_rows(where)
        assert len(rows) == 2 * 2 * n, where
        assert {r["checkpoint"] for r in rows} == {f"w{w}/step-{i}" for w in (0, 1) for i in range(n)}
