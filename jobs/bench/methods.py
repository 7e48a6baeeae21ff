"""`selfsup bench methods`: every objective on every modality it has a config for, under equal compute.

A cell is one (method, modality, budget): the bundled config `jobs/configs/<method>_<modality>.yaml`
(discovered, so a new config joins without code changes) pretrained on that modality's demo data
(as `selfsup demo` writes it) for --budget-minutes of training wall time, with the LR schedule
fitted to that time (train.time_schedule, as --quick and --quality do) and only the final
checkpoint kept; then that checkpoint is evaluated as the demo evaluates (frozen features, kNN
and linear probe on every probe set and target of the demo). Random init and raw input are
computed once per architecture (backbone, its arguments, seed and eval view: results.arch_key)
and cached; each cell's Δ is against the random init of its own architecture.

Cost: cells × (budget + 2-3 minutes of start-up and evaluation on 2 idle cores, more when
loaded), and writing the demo data once (minutes); the default run (all modalities, 5 minutes)
takes hours, and --budgets adds best-three × budgets cells per modality. Each finished cell is
one JSON file in WORKDIR/cells/ written atomically: a rerun skips finished cells (and failed ones
unless --retry-failed); --rerun METHOD/MODALITY[@MINUTES] redoes that one cell (alone, unless
--modality or --methods are given too). A cell that fails is recorded with its error line and
the bench goes on. At the end the doc (--out, default docs/methods.md, the plot beside it) is
written from every cell record in the workdir.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from selfsup.jobs.demo_plans import PLANS, DemoPlan

DEMO_DATA = "runs/demo/data/"    # where the bundled configs point their sources; remapped to WORKDIR/data/
ONCE = 1_000_000                 # train.steps and ckpt_every: the time budget, not a step count, ends a cell
CELLS, BASELINES, RUNS, DATA, TRAINED = "cells", "baselines", "runs", "data", "trained"
DONE, FAILED = "done", "failed"


@dataclass(frozen=True)
class MethodsBenchOptions:
    """What `selfsup bench methods` runs and where it keeps its cells."""

    modalities: tuple[str, ...] = ()      # empty: every modality of the demo plans
    methods: tuple[str, ...] = ()         # empty: every method with a config
    budget_minutes: float = 5.0           # training wall time per cell
    workdir: str = "runs/bench/methods"
    rerun: tuple[str, ...] = ()           # METHOD/MODALITY[@MINUTES] cells to redo
    retry_failed: bool = False
    out: str = "docs/methods.md"
    data: Optional[str] = None            # folder holding the datasets (selfsup.jobs.data)
    budgets: tuple[float, ...] = ()       # extra budgets for the best three per modality (the plot)
    use_ray: bool = True                  # False: train and extract features in this process
    overrides: tuple[str, ...] = ()       # dotted overrides for every cell (after the bench's own)
    configs: Optional[str] = None         # folder of <method>_<modality>.yaml (default: the bundled configs)
    command: str = "selfsup bench methods"  # as the doc quotes it


@dataclass(frozen=True)
class Cell:
    """One method on one modality with one training budget."""

    method: str
    modality: str
    config: Path
    budget: float

    @property
    def name(self) -> str:
        """`simclr/image`: what --rerun names (without @MINUTES: the main budget)."""
        return f"{self.method}/{self.modality}"

    @property
    def key(self) -> str:
        """`simclr/image@5`: the cell's identity in the workdir."""
        return f"{self.name}@{self.budget:g}"


@dataclass(frozen=True)
class CellContext:
    """What running a cell needs besides the cell: the modality's plan, data and the bench's settings."""

    plan: DemoPlan
    eval_sets: tuple[tuple[str, str], ...]   # (name, folder URL); the first holds the pretraining split
    data_root: str
    workdir: Path
    overrides: tuple[str, ...] = ()
    use_ray: bool = True


CellRunner = Callable[[Cell, CellContext], dict[str, Any]]


def discover(configs: Path, modalities: Any) -> dict[str, dict[str, Path]]:
    """modality → method → config path, from every `<method>_<modality>.yaml` in `configs`."""
    return {m: {p.stem[: -len(m) - 1]: p for p in sorted(configs.glob(f"*_{m}.yaml"))} for m in modalities}


def select_cells(options: MethodsBenchOptions, found: Mapping[str, Mapping[str, Path]]) -> list[Cell]:
    """The main-budget cells the options ask for; ValueError naming an unknown modality or method."""
    bad = [m for m in options.modalities if m not in found]
    if bad:
        raise ValueError(f"--modality {bad[0]!r}: valid modalities are {', '.join(sorted(found))}")
    if options.budget_minutes <= 0 or any(b <= 0 for b in options.budgets):
        raise ValueError(f"budgets must be positive minutes, got {options.budget_minutes:g} and "
                         f"{','.join(f'{b:g}' for b in options.budgets) or 'none'}")
    modalities = options.modalities or tuple(found)
    known = sorted({meth for m in modalities for meth in found[m]})
    bad = [m for m in options.methods if m not in known]
    if bad:
        raise ValueError(f"--methods {bad[0]!r}: no jobs/configs/{bad[0]}_<modality>.yaml for "
                         f"{', '.join(modalities)}; valid methods are {', '.join(known)}")
    return [Cell(meth, m, path, options.budget_minutes) for m in modalities for meth, path in found[m].items()
            if not options.methods or meth in options.methods]


def parse_cell(text: str, budget: float, found: Mapping[str, Mapping[str, Path]]) -> Cell:
    """`METHOD/MODALITY[@MINUTES]` as a Cell (default: the main budget); ValueError listing valid cells."""
    name, _, minutes = text.partition("@")
    method, _, modality = name.partition("/")
    if method not in found.get(modality, {}):
        valid = [f"{meth}/{m}" for m in found for meth in found[m]]
        raise ValueError(f"--rerun {text!r}: no such cell; valid cells are {', '.join(valid)} "
                         "(add @MINUTES for a --budgets cell)")
    try:
        minutes_f = float(minutes) if minutes else budget
    except ValueError:
        raise ValueError(f"--rerun {text!r}: @{minutes} is not a number of minutes") from None
    return Cell(method, modality, found[modality][method], minutes_f)


def cell_path(workdir: Path, cell: Cell) -> Path:
    """WORKDIR/cells/<modality>/<method>@<minutes>.json: the one record of a cell."""
    return workdir / CELLS / cell.modality / f"{cell.method}@{cell.budget:g}.json"


def run_path(workdir: Path, cell: Cell) -> Path:
    """WORKDIR/runs/<modality>/<method>@<minutes>: the cell's run folder."""
    return workdir / RUNS / cell.modality / f"{cell.method}@{cell.budget:g}"


def baseline_path(workdir: Path, modality: str, arch: str) -> Path:
    """WORKDIR/baselines/<modality>/<arch>.json: random init and raw input of one architecture."""
    return workdir / BASELINES / modality / f"{arch}.json"


def write_json(path: Path, record: Mapping[str, Any]) -> None:
    """Write atomically: a temporary file beside it, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, path)


def read_records(workdir: Path, kind: str) -> list[dict[str, Any]]:
    """Every cell (kind `cells`) or baseline (`baselines`) record in the workdir."""
    return [json.loads(p.read_text()) for p in sorted((workdir / kind).glob("*/*.json"))]


def forget(workdir: Path, cell: Cell) -> None:
    """Delete one cell's record and run folder (for --rerun)."""
    cell_path(workdir, cell).unlink(missing_ok=True)
    (workdir / TRAINED / cell.modality / f"{cell.method}@{cell.budget:g}.json").unlink(missing_ok=True)
    shutil.rmtree(run_path(workdir, cell), ignore_errors=True)


def pending(workdir: Path, cells: list[Cell], retry_failed: bool) -> list[Cell]:
    """The cells without a record (or with a failed one, when retrying)."""
    out = []
    for c in cells:
        path = cell_path(workdir, c)
        if not path.exists() or (retry_failed and json.loads(path.read_text()).get("state") == FAILED):
            out.append(c)
    return out


def log(msg: str) -> None:
    """Progress goes to stderr, so --json leaves stdout clean."""
    print(msg, file=sys.stderr, flush=True)


def bench_methods(options: MethodsBenchOptions, plans: Mapping[str, DemoPlan] = PLANS,
                  runner: Optional[CellRunner] = None) -> dict[str, Any]:
    """Run the missing cells (each recorded as it ends), then the --budgets cells, then write the doc."""
    from selfsup.jobs.bench.methods_doc import best, write_doc
    from selfsup.jobs.common import CONFIGS

    runner = runner or run_cell
    workdir = Path(options.workdir)
    found = discover(Path(options.configs) if options.configs else CONFIGS, plans)
    cells = select_cells(options, found)
    if options.rerun and not (options.modalities or options.methods):
        cells = []  # --rerun alone: just the cells it names
    again = [parse_cell(text, options.budget_minutes, found) for text in options.rerun]  # all valid first
    for cell in again:
        forget(workdir, cell)
        cells += [cell] if cell not in cells else []
    todo = pending(workdir, cells, options.retry_failed)
    minutes = sum(c.budget + plans[c.modality].eval_minutes for c in todo)
    log(f"bench methods: {len(cells)} cell(s), {len(cells) - len(todo)} already recorded, {len(todo)} to run "
        f"(about {minutes:.0f} min)")
    run_cells(todo, options, plans, runner, workdir)
    if options.budgets:
        records = read_records(workdir, CELLS)
        extra = [Cell(r["method"], r["modality"], found[r["modality"]][r["method"]], b)
                 for m in {c.modality for c in cells} for r in best(records, m, options.budget_minutes, 3)
                 for b in options.budgets if r["method"] in found[m]]
        todo = pending(workdir, [c for c in extra if c.budget != options.budget_minutes], options.retry_failed)
        log(f"bench methods: --budgets: {len(todo)} cell(s) to run for the best three")
        run_cells(todo, options, plans, runner, workdir)
    records = read_records(workdir, CELLS)
    written = write_doc(records, read_records(workdir, BASELINES), Path(options.out), options.command,
                        options.budget_minutes)
    for path in written:
        log(f"bench methods: wrote {path}")
    return {"workdir": str(workdir), "budget_minutes": options.budget_minutes, "written": [str(p) for p in written],
            "cells": records}


def run_cells(cells: list[Cell], options: MethodsBenchOptions, plans: Mapping[str, DemoPlan],
              runner: CellRunner, workdir: Path) -> None:
    """Prepare each modality's data once, then run and record its cells; a failure is recorded, not raised."""
    from selfsup.jobs.data import find_dataset, missing_line
    from selfsup.jobs.demo_plans import write_plan_data

    if options.use_ray and cells:
        start_ray(cells)
    for modality in dict.fromkeys(c.modality for c in cells):
        plan = plans[modality]
        source = find_dataset(plan.dataset, options.data)
        if source is None:
            log(missing_line(plan.dataset, options.data))
            continue
        data_root = str((workdir / DATA).resolve())
        try:
            with contextlib.redirect_stdout(sys.stderr):
                written = write_plan_data(plan, source, data_root, quiet=True, data=options.data)
        except Exception as e:  # noqa: BLE001 - the other modalities go on; these cells stay to run
            log(f"bench methods: {modality} data could not be written ({type(e).__name__}: {e}); "
                f"its cells are left to a later run")
            continue
        for line in written.missing:
            log(f"bench methods: {modality} cells are not evaluated on {line}")
        ctx = CellContext(plan, tuple(written.eval_sets), data_root, workdir, options.overrides, options.use_ray)
        for cell in (c for c in cells if c.modality == modality):
            log(f"== bench methods: {cell.key} ({cell.config.name})")
            t0, load = time.time(), load_average()
            try:
                with contextlib.redirect_stdout(sys.stderr):
                    record = {**runner(cell, ctx), "state": DONE}
            except Exception as e:  # noqa: BLE001 - one cell's failure is recorded; the others go on
                line = (str(e).strip().splitlines() or [""])[-1][:300]
                record = {"state": FAILED, "error": f"{type(e).__name__}: {line}"}
                log(f"bench methods: {cell.key} failed: {record['error']}")
            write_json(cell_path(workdir, cell), {
                "method": cell.method, "modality": cell.modality, "config": cell.config.stem,
                "budget_minutes": cell.budget, "cell_seconds": round(time.time() - t0, 1),
                "date": time.strftime("%Y-%m-%d"), "load_at_start": load, **record})


def load_average() -> Optional[float]:
    """The machine's 1-minute load average now (None where the OS has none): recorded as a cell starts,
    before its own work weighs on it, so the doc can say how busy the machine was around each cell."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def start_ray(cells: list[Cell]) -> None:
    """A local Ray with the CPUs the largest config asks for: started by the first cell, a smaller
    cluster would leave a later, larger config waiting for resources forever."""
    from selfsup.jobs.common import ensure_ray, load_pretrain_config
    from selfsup.jobs.training import local_cpus

    need = 1.0
    for c in cells:
        try:
            need = max(need, local_cpus(load_pretrain_config(str(c.config), [], None)))
        except Exception:  # noqa: BLE001 - sizing only: the cell records its own error when it runs
            pass
    ensure_ray(None, need)


def cell_overrides(cfg: Any, run: Path, ctx: CellContext, budget: float) -> list[str]:
    """The bench's overrides: run folder, the demo data in WORKDIR/data, the time-fitted budget, one checkpoint."""
    sources = [{"url": ctx.data_root + "/" + s.url[len(DEMO_DATA):] if s.url.startswith(DEMO_DATA) else s.url,
                "split": s.split, **({"weight": s.weight} if s.weight is not None else {}),
                **({"name": s.name} if s.name else {}), **({"target": s.target} if s.target else {})}
               for s in cfg.data.sources]
    return [f"run={run.resolve()}", f"data.sources={json.dumps(sources)}", f"train.time_limit_minutes={budget:g}",
            "train.time_schedule=true", f"train.steps={ONCE}", f"train.ckpt_every={ONCE}", "train.keep=1",
            *ctx.overrides]


def train_cell(cell: Cell, ctx: CellContext) -> tuple[str, float]:
    """Pretrain the cell's config within its budget (a finished run folder is reused); returns (run, wall s)."""
    from selfsup.jobs.common import load_pretrain_config
    from selfsup.jobs.training import TrainOptions, train
    from selfsup.trainers import run_folder as rf

    run = run_path(ctx.workdir, cell)
    trained = ctx.workdir / TRAINED / cell.modality / f"{cell.method}@{cell.budget:g}.json"
    if trained.exists() and rf.run_state(str(run.resolve())) == rf.FINISHED:  # evaluation was cut off
        return str(run.resolve()), json.loads(trained.read_text())["wall_seconds"]
    shutil.rmtree(run, ignore_errors=True)  # a cut-off run would not fit its budget: start over
    cfg = load_pretrain_config(str(cell.config), [], None)
    cfg = load_pretrain_config(str(cell.config), cell_overrides(cfg, run, ctx, cell.budget), None)
    t0 = time.time()
    train(cfg, TrainOptions(use_ray=ctx.use_ray, quiet=True))
    wall = round(time.time() - t0, 1)
    write_json(trained, {"wall_seconds": wall})
    return cfg.run, wall


def run_cell(cell: Cell, ctx: CellContext) -> dict[str, Any]:
    """Pretrain, evaluate the final checkpoint, cache the architecture's baselines; the cell's record."""
    from selfsup.jobs.evaluation import results
    from selfsup.trainers import checkpoint as ck
    from selfsup.trainers import run_folder as rf

    run, wall = train_cell(cell, ctx)
    ckpt = ck.latest_checkpoint(run)
    if ckpt is None:
        raise RuntimeError(f"the run {run} left no checkpoint")
    meta = ck.read_meta(ckpt)
    arch = results.arch_key(meta)
    cached = baseline_path(ctx.workdir, cell.modality, arch)
    t0 = time.time()
    rows = evaluate_cell(run, ckpt, ctx, baselines=not cached.exists())
    if not cached.exists():
        write_json(cached, baseline_record(rows, meta, arch, cell.modality))
    lines = rf.read_metrics(run)  # the first window holds the start-up (workers, streams, warm-up)
    logged = [m["samples_per_s"] for m in lines[1:] or lines if m.get("samples_per_s")]
    cfg = meta.get("config", {})
    return {"backbone": meta["backbone"], "arch": arch, "steps": int(meta["step"]), "wall_seconds": wall,
            "samples_per_s": round(statistics.median(logged), 1) if logged else None,
            "global_batch": cfg.get("data", {}).get("batch_size", 0) * cfg.get("train", {}).get("accum", 1)
            * (cfg.get("scaling", {}).get("num_workers", 1) if ctx.use_ray else 1),
            "saw_labels": saw_labels(meta), "eval_seconds": round(time.time() - t0, 1),
            "accuracy": accuracies(rows, "pretrained", ckpt)}


def evaluate_cell(run: str, ckpt: str, ctx: CellContext, baselines: bool) -> list[dict[str, Any]]:
    """kNN and linear probe of `ckpt` on every eval set and target of the plan (with the baselines if asked)."""
    from selfsup.jobs.evaluation import results
    from selfsup.jobs.evaluation.job import METHODS, EvalJob, EvalOptions, EvalSet

    if ctx.use_ray:  # up already after training here, unless a finished run was reused
        from selfsup.jobs.common import ensure_ray

        ensure_ray()
    sets = [EvalSet(name, url, url) for name, url in ctx.eval_sets]
    options = EvalOptions(no_baselines=not baselines, quiet=True, use_ray=ctx.use_ray)
    for target in ctx.plan.targets:
        EvalJob(run, sets, list(METHODS), target, None, options).evaluate(ckpt)
    return results.read_rows(run)


def accuracies(rows: list[dict[str, Any]], encoder: str, ckpt: str = "") -> dict[str, dict[str, float]]:
    """`eval_set/target` → method → accuracy of one encoder's rows (the newest of each)."""
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["encoder"] == encoder and (encoder != "pretrained" or r["checkpoint"] == ckpt):
            out.setdefault(f"{r['eval_set']}/{r['target']}", {})[r["method"]] = float(r["accuracy"])
    return out


def baseline_record(rows: list[dict[str, Any]], meta: Mapping[str, Any], arch: str, modality: str) -> dict[str, Any]:
    """Random init and raw input accuracies of one architecture, with what names it in the doc."""
    args = meta.get("modality_args", {})
    view = ", ".join(f"{k} {args[k]}" for k in ("output", "size", "frames", "seconds") if k in args)
    return {"arch": arch, "modality": modality, "backbone": meta["backbone"],
            "backbone_args": meta.get("backbone_args", {}), "view": view,
            "random_init": accuracies(rows, "random_init"), "raw": accuracies(rows, "raw")}


def saw_labels(meta: Mapping[str, Any]) -> bool:
    """Whether pretraining used labels: the flag the run records (`saw_labels`, e.g. s4l) if present,
    else whether the config draws on a labeled (probe-*) split."""
    if "saw_labels" in meta:
        return bool(meta["saw_labels"])
    sources = meta.get("config", {}).get("data", {}).get("sources", [])
    return any(str(s.get("split", "")).startswith("probe") for s in sources)

