"""`selfsup bench methods`: cell bookkeeping (resume, --rerun, failures), the doc writer, option errors,
and one tiny real cell end to end (SimCLR on a few Fashion-MNIST images, no Ray, a few seconds)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from selfsup.jobs.bench.methods import (FAILED, Cell, CellContext, MethodsBenchOptions, baseline_path,
                                        bench_methods, cell_path)
from selfsup.jobs.bench.methods_doc import delta, format_doc
from selfsup.jobs.cli import main
from selfsup.jobs.demo_plans import DemoPlan
from tests.conftest import FMNIST, ROOT

# no splits to write: the bookkeeping tests run a recording runner instead of training
EMPTY_PLAN = {"image": DemoPlan("fashion-mnist", "fm", "image", "a_image", splits=[])}
TINY_PLAN = {"image": DemoPlan("fashion-mnist", "fashion-mnist", "image", "simclr_image", splits=[
    ("pretrain", ["--subset", "train", "--limit", "64", "--samples-per-shard", "32", "--workers", "1"]),
    ("probe-train", ["--subset", "train", "--limit", "60", "--samples-per-shard", "60", "--workers", "1"]),
    ("probe-test", ["--subset", "test", "--limit", "40", "--samples-per-shard", "40", "--workers", "1"])])}


class Recorder:
    """A cell runner that trains nothing: it notes the cells it ran and fails the ones named."""

    def __init__(self, fail: tuple[str, ...] = ()) -> None:
        self.ran: list[str] = []
        self.fail = fail

    def __call__(self, cell: Cell, ctx: CellContext) -> dict[str, Any]:
        self.ran.append(cell.key)
        if cell.method in self.fail:
            raise RuntimeError(f"objective {cell.method!r} blew up\nNaN loss at step 3")
        linear = {"a": 0.8, "b": 0.5, "c": 0.7, "d": 0.6}[cell.method] + cell.budget / 100
        return {"arch": "x", "backbone": "net", "steps": 10, "samples_per_s": 100.0, "saw_labels": False,
                "wall_seconds": 1.0, "accuracy": {"fm/cls": {"knn": 0.5, "linear": linear}}}


@pytest.fixture
def configs(tmp_path: Path) -> Path:
    folder = tmp_path / "configs"
    folder.mkdir()
    for name in ("a_image", "b_image", "c_image", "d_image", "a_audio"):
        (folder / f"{name}.yaml").write_text("# discovered by name only\n")
    return folder


def options(tmp_path: Path, configs: Path, **kw: Any) -> MethodsBenchOptions:
    return MethodsBenchOptions(**{"modalities": ("image",), "workdir": str(tmp_path / "work"),
                                  "out": str(tmp_path / "doc" / "methods.md"), "data": str(FMNIST),
                                  "configs": str(configs), "use_ray": False, **kw})


def test_cells_resume_rerun_alone_and_failures_recorded(tmp_path: Path, configs: Path) -> None:
    runner = Recorder(fail=("b",))
    result = bench_methods(options(tmp_path, configs), EMPTY_PLAN, runner)
    assert runner.ran == ["a/image@5", "b/image@5", "c/image@5", "d/image@5"]  # b failed, the others went on
    states = {r["method"]: r["state"] for r in result["cells"]}
    assert states == {"a": "done", "b": FAILED, "c": "done", "d": "done"}
    failed = json.loads(cell_path(tmp_path / "work", Cell("b", "image", Path(), 5.0)).read_text())
    assert failed["error"] == "RuntimeError: NaN loss at step 3"  # the error's last line
    doc = (tmp_path / "doc" / "methods.md").read_text()
    assert "failed: RuntimeError: NaN loss at step 3" in doc
    loads = [r["load_at_start"] for r in result["cells"]]  # each cell's machine load as it started
    assert all(isinstance(x, float) and x >= 0 for x in loads) and "as the cells started" in doc
    assert f"load average {min(loads):.1f}–{max(loads):.1f}" in doc and "when written" not in doc

    again = Recorder()
    bench_methods(options(tmp_path, configs), EMPTY_PLAN, again)
    assert again.ran == []  # every cell recorded: nothing runs, failed ones included
    bench_methods(options(tmp_path, configs, retry_failed=True), EMPTY_PLAN, again)
    assert again.ran == ["b/image@5"]

    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "work" / "cells" / "image").iterdir()}
    rerun = Recorder()
    bench_methods(options(tmp_path, configs, modalities=(), rerun=("c/image",)), EMPTY_PLAN, rerun)
    assert rerun.ran == ["c/image@5"]  # alone: not a/audio, not the other image cells
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "work" / "cells" / "image").iterdir()}
    assert [n for n in before if before[n] != after[n]] == ["c@5.json"]


def test_budgets_run_the_best_three_at_each_extra_budget(tmp_path: Path, configs: Path) -> None:
    runner = Recorder()
    bench_methods(options(tmp_path, configs, budgets=(1.0, 5.0)), EMPTY_PLAN, runner)
    assert runner.ran[4:] == ["a/image@1", "c/image@1", "d/image@1"]  # b scored lowest; @5 exists already
    assert (tmp_path / "doc" / "methods_budget.png").stat().st_size > 0
    doc = (tmp_path / "doc" / "methods.md").read_text()
    assert "methods_budget.png" in doc
    figures = {r[1]: r for r in table_rows(doc, "image")}  # the plot's figures, one row per method of the best three
    assert sorted(figures) == ["a", "c", "d"] and all(len(r) == 4 and "steps" in r[2] and "steps" in r[3]
                                                      for r in figures.values())


@pytest.mark.parametrize("flags, named", [
    (["--methods", "nope"], "--methods 'nope'"), (["--rerun", "simclr/nope"], "valid cells are"),
    (["--budget-minutes", "0"], "budgets must be positive"), (["--budgets", "1,x"], "--budgets '1,x'")])
def test_option_errors_exit_2_naming_the_valid_ones(flags: list[str], named: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "methods", "--workdir", str(tmp_path / "w"), *flags]) == 2
    err = capsys.readouterr().err
    assert named in err, err
    if flags[0] in ("--methods", "--rerun"):
        assert "simclr" in err and ("image" in err or "mae" in err), err  # the valid ones listed
    assert not (tmp_path / "w").exists()  # refused before anything was written


def test_unknown_modality_exits_2_listing_the_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["bench", "methods", "--modality", "smell"])
    assert e.value.code == 2
    assert "'audio', 'image', 'video'" in capsys.readouterr().err


def record(method: str, knn: float, linear: dict[str, float], arch: str = "r1", **kw: Any) -> dict[str, Any]:
    return {"method": method, "modality": "video", "config": f"{method}_video", "budget_minutes": 5.0,
            "state": "done", "arch": arch, "backbone": "video_cnn_small", "steps": 120, "samples_per_s": 321.4,
            "wall_seconds": 300.0, "saw_labels": False,
            "accuracy": {c: {"knn": knn, "linear": v} for c, v in linear.items()}, **kw}


def table_rows(text: str, first: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first}")]


def test_doc_tables_and_deltas_from_records() -> None:
    cols = ("mfm/cls", "mfm/motion")
    records = [
        record("simclr", 0.5, {"mfm/cls": 0.60, "mfm/motion": 0.99}),
        record("mae", 0.4, {"mfm/cls": 0.45, "mfm/motion": 0.90}, arch="v1", backbone="vit_micro"),
        record("s4l", 0.7, {"mfm/cls": 0.80, "mfm/motion": 0.95}, saw_labels=True),
        {"method": "byol", "modality": "video", "config": "byol_video", "budget_minutes": 5.0, "state": "failed",
         "error": "RuntimeError: out of memory"},
        record("simclr", 0.1, {"mfm/cls": 0.1, "mfm/motion": 0.1}, budget_minutes=1.0),  # not the main budget
    ]
    baselines = [{"arch": a, "modality": "video", "backbone": b, "view": "size 64, frames 8",
                  "random_init": {c: {"knn": 0.30, "linear": lin} for c in cols},
                  "raw": {c: {"knn": 0.20, "linear": 0.25} for c in cols}}
                 for a, b, lin in (("r1", "video_cnn_small", 0.40), ("v1", "vit_micro", 0.35))]
    text = format_doc(records, baselines, "selfsup bench methods", 5.0, "2 cores")
    assert "**5 minutes**" in text and "2 cores" in text and "## video" in text
    head = table_rows(text, "method")[0]
    assert head[7:] == ["mfm/cls kNN", "mfm/cls linear", "mfm/cls Δ linear",
                        "mfm/motion kNN", "mfm/motion linear", "mfm/motion Δ linear"]
    rows = {r[0]: r for r in table_rows(text, "**")}
    assert list(rows) == ["**s4l**", "**simclr**", "**mae**", "**byol**"]  # by mean linear; failed last
    assert rows["**s4l**"][3] == "yes" and rows["**simclr**"][3] == "no"
    assert rows["**simclr**"][4:7] == ["120", "321", "300"]
    assert rows["**simclr**"][7:] == ["50.00", "60.00", "+20.00", "50.00", "99.00", "+59.00"]
    assert rows["**mae**"][7:] == ["40.00", "45.00", "+10.00", "40.00", "90.00", "+55.00"]  # vs its own ViT init
    assert "failed: RuntimeError: out of memory" in rows["**byol**"]
    assert all(len(r) == len(head) for r in rows.values())
    randoms = table_rows(text, "random init")
    assert [r[2] for r in randoms] == ["video_cnn_small", "vit_micro"] and randoms[0][7:9] == ["30.00", "40.00"]
    assert len(table_rows(text, "raw input")) == 1  # the same view and figures: one row
    twin = {**baselines[0], "arch": "r2", "random_init": {c: {"knn": 0.1, "linear": 0.1} for c in cols}}
    again = format_doc([records[0], {**records[0], "method": "byol", "arch": "r2"}], [baselines[0], twin],
                       "selfsup bench methods", 5.0, "2 cores")
    assert sorted(r[0] for r in table_rows(again, "random init")) == ["random init (r1)", "random init (r2)"]
    assert table_rows(again, "**byol")[0][9] == "+50.00"  # against its own architecture's init
    same = format_doc([records[0], {**records[0], "method": "byol", "arch": "r2"}],
                      [baselines[0], {**baselines[0], "arch": "r2"}], "selfsup bench methods", 5.0, "2 cores")
    assert [r[0] for r in table_rows(same, "random init")] == ["random init"]  # variants with the same figures: one row
    assert "Start with **s4l** on video (highest mean linear accuracy, and it saw labels)" in text
    assert delta(records[0], {"r1": baselines[0]}, "mfm/nope") is None


def test_one_real_cell_end_to_end(tmp_path: Path) -> None:
    """simclr/image with a budget of about 3 s, in this process, on 64 real images; then a resumed
    bench trains nothing and writes the same doc."""
    small = ["data.batch_size=8", "data.mix=2", "data.streams=1", "data.backend=inline", "train.log_every=1",
             "train.warmup_steps=1", "objective.backbone_args.width=8", "objective.args.proj_dim=32"]
    opts = MethodsBenchOptions(modalities=("image",), methods=("simclr",), budget_minutes=0.05,
                               workdir=str(tmp_path / "work"), out=str(tmp_path / "methods.md"), data=str(FMNIST),
                               use_ray=False, overrides=tuple(small))
    result = bench_methods(opts, TINY_PLAN)
    [cell] = result["cells"]
    assert cell["state"] == "done", cell
    assert (cell["method"], cell["config"], cell["backbone"], cell["saw_labels"]) == (
        "simclr", "simclr_image", "convnet_small", False)
    assert cell["steps"] >= 1 and cell["samples_per_s"] > 0 and cell["wall_seconds"] > 2
    assert set(cell["accuracy"]) == {"fashion-mnist/cls"} and set(cell["accuracy"]["fashion-mnist/cls"]) == {"knn", "linear"}
    assert all(0 <= v <= 1 for v in cell["accuracy"]["fashion-mnist/cls"].values())
    base = json.loads(baseline_path(tmp_path / "work", "image", cell["arch"]).read_text())
    assert base["backbone"] == "convnet_small" and set(base["random_init"]["fashion-mnist/cls"]) == {"knn", "linear"}
    doc = (tmp_path / "methods.md").read_text()
    assert "| **simclr** | `simclr_image` | convnet_small | no |" in doc and "random init" in doc
    assert str(ROOT / "jobs" / "configs") not in doc
    assert bench_methods(opts, TINY_PLAN)["cells"] == [cell]  # resumed: recorded, not trained again


def test_a_cell_keeps_its_configs_sources_splits_weights_and_label_targets(tmp_path: Path) -> None:
    """The s4l config's labeled source keeps `target: cls` when the bench moves its data to the workdir."""
    from selfsup.jobs.bench.methods import cell_overrides
    from selfsup.jobs.common import CONFIGS, load_pretrain_config
    from selfsup.jobs.demo_plans import PLANS

    cfg = load_pretrain_config(str(CONFIGS / "s4l_image.yaml"), [], None)
    ctx = CellContext(PLANS["image"], (), str(tmp_path / "data"), tmp_path)
    args = cell_overrides(cfg, tmp_path / "run", ctx, 2.0)
    sources = json.loads(next(a for a in args if a.startswith("data.sources="))[len("data.sources="):])
    assert [(s["split"], s.get("weight"), s.get("target")) for s in sources] == [
        ("pretrain", 0.8, None), ("probe-train", 0.2, "cls")]
    assert all(s["url"] == str(tmp_path / "data") + "/fashion-mnist" for s in sources)


def test_load_note_gives_the_range_and_says_which_records_predate_it() -> None:
    from selfsup.jobs.bench.methods_doc import load_note

    assert load_note([{"load_at_start": 0.5}, {"load_at_start": 2.25}]) == "load average 0.5–2.2 as the cells started"
    assert load_note([{"load_at_start": 1.0}, {}]) == ("load average 1.0–1.0 as the cells started "
                                                       "(1 of 2 cells' records predate it)")
    assert load_note([{}, {"load_at_start": None}]) == "load average not recorded (the cells' records predate it)"
