"""The demos' data plans: extra eval sets from other sources (the instrument-family set) and mixed pretraining."""
from __future__ import annotations

import pytest

from selfsup.jobs import data as datasets
from selfsup.jobs.demo_plans import PLANS, QUALITY, QUICK, DemoPlan, PlanData, write_plan_data
from selfsup.pipeline.snapshot import SourceSpec, build_snapshot
from tests.conftest import FSDD
from tests.pipeline.sources.test_soundfont import make_font

# a few clips of one speaker: enough to show the plan's own splits beside the extra set
TINY = [("pretrain", ["--include", r"_theo_[0-2]\.wav$"]), ("probe-train", ["--include", r"_theo_[3-5]\.wav$"]),
        ("probe-test", ["--include", r"_theo_[6-9]\.wav$"])]


def test_an_extra_eval_set_is_written_from_its_own_source_and_evaluated_beside_the_plans(tmp_path):
    fonts = tmp_path / "fonts"
    fonts.mkdir()
    make_font(fonts / datasets.SOUNDFONT_FILE)  # a hand-made font under the name the instrument set looks for
    plan = DemoPlan("fsdd", "fsdd", "audio", "simclr_audio", TINY, extra_eval=("instruments",))
    written = write_plan_data(plan, FSDD, str(tmp_path / "data"), quiet=True, data=str(fonts))
    assert written.eval_sets == [("fsdd", f"{tmp_path}/data/fsdd"), ("instruments", f"{tmp_path}/data/instruments")]
    assert written.pretrain == [(f"{tmp_path}/data/fsdd", 1.0)] and not written.missing
    train = build_snapshot([SourceSpec(url=f"{tmp_path}/data/instruments", split="probe-train")])
    test = build_snapshot([SourceSpec(url=f"{tmp_path}/data/instruments", split="probe-test")])
    assert train.n_samples > test.n_samples > 0  # the font's notes, split so no note is in both
    again = write_plan_data(plan, FSDD, str(tmp_path / "data"), quiet=True, data=str(fonts))
    assert again == written  # a rerun keeps the finished shards


def test_a_missing_extra_eval_set_is_skipped_with_the_way_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(datasets.SYSTEM_PLACES, "timgm6mb", ())
    monkeypatch.setattr(datasets, "data_roots", lambda data=None: [tmp_path / "nowhere"])
    plan = DemoPlan("fsdd", "fsdd", "audio", "simclr_audio", TINY, extra_eval=("instruments",))
    written = write_plan_data(plan, FSDD, str(tmp_path / "data"), quiet=True)
    assert [name for name, _ in written.eval_sets] == ["fsdd"]
    assert len(written.missing) == 1 and "apt-get install timgm6mb-soundfont" in written.missing[0]
    assert "skipping the eval set instruments" in capsys.readouterr().err


def test_pretraining_sources_carry_their_weights_into_the_override():
    pd = PlanData([("fsdd", "/d/fsdd")], [("/d/fsdd", 1.0), ("/d/general-audio", 0.5)])
    assert pd.sources_override() == ("data.sources=[{url: /d/fsdd, split: pretrain, weight: 1}, "
                                     "{url: /d/general-audio, split: pretrain, weight: 0.5}]")
    with pytest.raises(ValueError, match="unknown data set 'nope'"):
        write_plan_data(DemoPlan("fsdd", "f", "audio", "c", [], extra_pretrain=(("nope", 1.0),)), FSDD, "/d")


def test_every_audio_plan_evaluates_the_instrument_families():
    for plans in (PLANS, QUALITY, QUICK):
        assert "instruments" in plans["audio"].extra_eval
