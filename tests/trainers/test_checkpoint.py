"""Checkpoint retention: what `prune` keeps with and without an evaluator marking checkpoints."""
from __future__ import annotations

import logging

import pytest

from selfsup.pipeline import storage
from selfsup.trainers import checkpoint as ck


def complete_checkpoints(run: str, steps: range) -> list[str]:
    """Checkpoint folders made complete by meta.json (written by the checkpoint module's own writer)."""
    urls = [storage.join(run, ck.CHECKPOINTS, ck.step_dir_name(s)) for s in steps]
    for step, url in zip(steps, urls):
        storage.write_bytes(storage.join(url, ck.ENCODER), b"weights")
        ck.write_meta(url, {"backbone": "convnet_small", "step": step})
    return urls


def test_keep_unevaluated_without_an_evaluator_keeps_every_checkpoint_and_says_so(
        tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    run = str(tmp_path / "run")
    urls = complete_checkpoints(run, range(1, 6))
    with caplog.at_level(logging.WARNING, logger=ck.__name__):
        assert ck.prune(run, keep=2, keep_unevaluated=True) == []
    assert "3 older checkpoint(s) kept only because no evaluation has marked them" in caplog.text
    assert "set train.keep_unevaluated=false to keep the last 2" in caplog.text

    storage.write_text(storage.join(urls[-1], ck.EVALUATED), "{}")  # an evaluator is at work: no warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=ck.__name__):
        assert ck.prune(run, keep=2, keep_unevaluated=True) == []
    assert caplog.text == ""
    assert ck.prune(run, keep=2, keep_unevaluated=False) == urls[:3]  # the default: the last `keep` stay
    assert [s for s, _ in ck.list_checkpoints(run)] == [4, 5]
