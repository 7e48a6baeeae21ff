"""Representation-quality bars (issue 8), end to end: `selfsup demo --quality` on the embedded default.

Slow (each up to 20 minutes on 2 cores); run with `make quality`. Every bar is relative to the
baselines the same evaluation computed: best pretrained checkpoint vs. raw inputs and random init.
"""
from __future__ import annotations

import time
import warnings

import pytest

from selfsup.jobs.data import find_dataset, missing_line
from selfsup.jobs.evaluation.results import read_results
from tests.conftest import run_cli

pytestmark = pytest.mark.quality


def best(rows, target, method, encoder, eval_set=None):
    vals = [r["accuracy"] for r in rows if r["target"] == target and r["method"] == method
            and r["encoder"] == encoder and eval_set in (None, r["eval_set"])]
    assert vals, f"no {encoder}/{method}/{target} result" + (f" on {eval_set}" if eval_set else "")
    return max(vals)


def quality_run(modality, tmp_path):
    t0 = time.time()
    res = run_cli("demo", "--modality", modality, "--quality", "--out", str(tmp_path), timeout=1800)
    minutes = (time.time() - t0) / 60
    assert res.returncode == 0, res.stderr[-3000:]
    print(res.stdout)
    return read_results(str(tmp_path / f"quality_{modality}")).to_pylist(), minutes


def test_video_motion_and_content(tmp_path):
    rows, minutes = quality_run("video", tmp_path)
    assert minutes <= 20.5
    motion = best(rows, "motion", "linear", "pretrained")
    assert motion >= 0.9 and motion >= best(rows, "motion", "linear", "random_init") + 0.10
    assert best(rows, "cls", "linear", "pretrained") > best(rows, "cls", "linear", "random_init")


def test_image_two_points_above_baselines(tmp_path):
    rows, minutes = quality_run("image", tmp_path)
    assert minutes <= 20.5
    for method in ("knn", "linear"):
        bar = max(best(rows, "cls", method, "raw"), best(rows, "cls", method, "random_init")) + 0.02
        assert best(rows, "cls", method, "pretrained") >= bar, method


def test_audio_held_out_speaker_and_instruments(tmp_path):
    """One checkpoint beats raw log-mel and random init by 2 points linear on both the held-out speaker and
    the instrument families (transfer beyond speech, issue 23); the instrument set needs timgm6mb."""
    rows, minutes = quality_run("audio", tmp_path)
    assert minutes <= 20.5
    # fsdd-customary (recordings 0-4 of every speaker) is reported, not barred: it has no headroom
    sets = ["fsdd", *(["instruments"] if find_dataset("timgm6mb") else [])]
    if len(sets) == 1:
        warnings.warn(f"audio bar checked on fsdd only: {missing_line('timgm6mb')}")
    bars = {s: max(best(rows, "cls", "linear", "raw", s), best(rows, "cls", "linear", "random_init", s)) + 0.02
            for s in sets}
    steps = {r["step"] for r in rows if r["encoder"] == "pretrained"}
    met = [step for step in sorted(steps)
           if all(best([r for r in rows if r["step"] == step], "cls", "linear", "pretrained", s) >= bars[s]
                  for s in sets)]
    assert met, f"no checkpoint meets {bars} on both sets"
