"""The writer of docs/methods.md (and the accuracy-vs-budget plot beside it) from `bench methods` records.

Cell records (jobs/bench/methods.py) hold a method's accuracies per probe column
(`eval_set/target` → kNN, linear); baseline records hold random init and raw input per
architecture. A modality may have any number of probe columns (video: class and motion; audio:
two speaker splits and instrument families): each gets kNN, linear and Δ linear vs. the
random init of the cell's own architecture, in percentage points.
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from selfsup.jobs.demo_plans import PLANS

SET_NOTES = {  # what the demo's probe sets are, for the doc
    "fashion-mnist": "Fashion-MNIST: probe-train 10,000 train images, probe-test the 10,000 test images",
    "fsdd": "spoken digits: probe-test speaker theo (held out of pretraining and probe-train)",
    "fsdd-customary": "spoken digits, customary split: recordings 0-4 of every speaker are probe-test",
    "instruments": "instrument families (General MIDI, 16 classes) of TimGM6mb's notes, no (program, key) in both "
                   "splits: transfer beyond speech",
    "moving-fashion-mnist": "moving Fashion-MNIST clips: targets cls (item class) and motion (direction)",
}


def columns(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The probe columns (`eval_set/target`) of the records, in first-seen order."""
    seen: dict[str, None] = {}
    for r in records:
        for col in r.get("accuracy", {}):
            seen.setdefault(col, None)
    return list(seen)


def score(record: Mapping[str, Any]) -> float:
    """What ranks methods: the mean linear-probe accuracy over the record's probe columns."""
    acc = [v["linear"] for v in record.get("accuracy", {}).values() if "linear" in v]
    return sum(acc) / len(acc) if acc else float("-inf")


def best(records: Sequence[Mapping[str, Any]], modality: str, budget: float, n: int) -> list[Mapping[str, Any]]:
    """The `n` finished cells of a modality at `budget` with the highest score."""
    done = [r for r in records if r["modality"] == modality and r["budget_minutes"] == budget
            and r.get("state") == "done"]
    return sorted(done, key=score, reverse=True)[:n]


def delta(record: Mapping[str, Any], baselines: Mapping[str, Mapping[str, Any]], col: str) -> Optional[float]:
    """Linear accuracy minus the random init's of the record's architecture, in points (None if unknown)."""
    base = baselines.get(record.get("arch", ""), {}).get("random_init", {}).get(col, {}).get("linear")
    acc = record.get("accuracy", {}).get(col, {}).get("linear")
    return None if base is None or acc is None else 100 * (acc - base)


def pct(value: Optional[float]) -> str:
    """0.8123 → '81.23'; None → '-'."""
    return "-" if value is None else f"{100 * value:.2f}"


def cell_row(r: Mapping[str, Any], cols: list[str], baselines: Mapping[str, Mapping[str, Any]]) -> str:
    """One table row of a cell (a failed one shows its error line)."""
    head = [f"**{r['method']}**", f"`{r['config']}`"]
    if r.get("state") != "done":
        return "| " + " | ".join([*head, "", "", f"failed: {r.get('error', '')}".replace("|", "/"),
                                  *[""] * (2 + 3 * len(cols))]) + " |"
    acc = r.get("accuracy", {})
    figures = []
    for c in cols:
        d = delta(r, baselines, c)
        figures += [pct(acc.get(c, {}).get("knn")), pct(acc.get(c, {}).get("linear")),
                    "-" if d is None else f"{d:+.2f}"]
    sps = r.get("samples_per_s")
    return "| " + " | ".join([*head, r.get("backbone", ""), "yes" if r.get("saw_labels") else "no",
                              str(r.get("steps", "-")), "-" if sps is None else f"{sps:.0f}",
                              f"{r.get('wall_seconds', 0):.0f}", *figures]) + " |"


def baseline_rows(used: list[Mapping[str, Any]], cols: list[str]) -> list[str]:
    """Random init rows (one per architecture) and raw input rows (one per distinct input view and figures)."""
    rows, raw_seen = [], set()
    inits: dict[tuple, list[str]] = {}  # (backbone, figures): the architectures (args hashes) that gave them
    for b in used:
        figs = tuple(f for c in cols for f in (pct(b["random_init"].get(c, {}).get("knn")),
                                               pct(b["random_init"].get(c, {}).get("linear")), ""))
        inits.setdefault((b["backbone"], figs), []).append(b["arch"])
    names = [backbone for backbone, _ in inits]
    for (backbone, figs), archs in inits.items():  # one row per backbone, unless its variants' figures differ
        label = "random init" + (f" ({', '.join(archs)})" if names.count(backbone) > 1 else "")
        rows.append("| " + " | ".join([label, "", backbone, "no", "0", "", "", *figs]) + " |")
    for b in used:
        raw = tuple(f for c in cols for f in (pct(b["raw"].get(c, {}).get("knn")),
                                              pct(b["raw"].get(c, {}).get("linear")), ""))
        if (b["view"], raw) not in raw_seen:
            raw_seen.add((b["view"], raw))
            rows.append("| " + " | ".join([f"raw input ({b['view']})", "", "", "no", "", "", "", *raw]) + " |")
    return rows


def modality_section(modality: str, records: Sequence[Mapping[str, Any]],
                     baselines: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The heading, probe-set notes, backbones and table of one modality."""
    cols = columns(records)
    ranked = sorted(records, key=lambda r: (r.get("state") != "done", -score(r), r["method"]))
    out = [f"## {modality}", ""]
    out += [f"- `{s}`: {SET_NOTES[s]}" for s in dict.fromkeys(c.split("/")[0] for c in cols) if s in SET_NOTES]
    families: dict[str, list[str]] = {}
    for r in ranked:
        if r.get("backbone"):
            families.setdefault(r["backbone"], []).append(r["method"])
    out += ["- backbones: " + "; ".join(f"`{b}` ({', '.join(m)})" for b, m in families.items()), ""]
    head = ["method", "config", "backbone", "saw labels", "steps", "samples/s", "train s"]
    head += [f"{c} {what}" for c in cols for what in ("kNN", "linear", "Δ linear")]
    out += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    out += [cell_row(r, cols, baselines) for r in ranked]
    used = [baselines[a] for a in dict.fromkeys(r.get("arch", "") for r in ranked) if a in baselines]
    out += baseline_rows(used, cols)
    top = [r for r in ranked if r.get("state") == "done"]
    if top:
        out += ["", f"Start with **{top[0]['method']}** on {modality} (highest mean linear accuracy"
                    f"{', and it saw labels' if top[0].get('saw_labels') else ''})."]
    return [*out, ""]


def machine_note(records: Sequence[Mapping[str, Any]]) -> str:
    """Cores, CPU, torch version and the load average as the cells started: what the samples/s depend on."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} cores ({platform.machine()}, {platform.processor() or 'cpu'}), {gpu}, "
            f"torch {torch.__version__}, {load_note(records)}")


def load_note(records: Sequence[Mapping[str, Any]]) -> str:
    """The range of the 1-minute load average the cells recorded as they started (older records have none)."""
    loads = [r["load_at_start"] for r in records if isinstance(r.get("load_at_start"), (int, float))]
    if not loads:
        return "load average not recorded (the cells' records predate it)"
    missing = len(records) - len(loads)
    return (f"load average {min(loads):.1f}–{max(loads):.1f} as the cells started"
            + (f" ({missing} of {len(records)} cells' records predate it)" if missing else ""))


def format_doc(records: Sequence[Mapping[str, Any]], baselines: Sequence[Mapping[str, Any]], command: str,
               budget: float, machine: str, plot: Optional[str] = None) -> str:
    """docs/methods.md as text: the tables of the main-budget cells, per modality."""
    by_arch = {b["arch"]: b for b in baselines}
    main = [r for r in records if r["budget_minutes"] == budget]
    out = ["# Methods under equal compute", "",
           f"Written by `{command}` on {time.strftime('%Y-%m-%d')}. Machine: {machine}.", "",
           f"Each cell pretrains one config (`jobs/configs/<method>_<modality>.yaml`) for **{budget:g} "
           f"minute{'' if budget == 1 else 's'}** of "
           "training wall time on the modality's demo data (`selfsup demo`'s shards), with the LR schedule fitted to "
           "that time (`train.time_schedule`), then evaluates the final checkpoint as the demo does: frozen features, "
           "kNN (k = 20, cosine) and a linear probe, in %. Δ linear is against the random init of the same "
           "architecture and seed, in points. samples/s is training throughput (median over logged steps), "
           "train s the wall time of the training call (start-up included). Each method keeps its own config's "
           "backbone, listed per modality below: in the bundled configs MAE uses a ViT and wav2vec 2.0 its own "
           "conv + transformer, the other methods the modality's small CNN.", ""]
    for modality in dict.fromkeys([*(m for m in PLANS if any(r["modality"] == m for r in main)),
                                   *(r["modality"] for r in main)]):
        out += modality_section(modality, [r for r in main if r["modality"] == modality], by_arch)
    if plot:
        out += ["## Accuracy against budget (best three per modality)", "", f"![accuracy vs budget]({plot})", ""]
        out += budget_table(records, budget)
    return "\n".join(out)


def budget_points(records: Sequence[Mapping[str, Any]], budget: float
                  ) -> dict[str, dict[str, dict[float, Mapping[str, Any]]]]:
    """modality → method → budget → finished cell, for the best three methods of each modality at `budget`."""
    out: dict[str, dict[str, dict[float, Mapping[str, Any]]]] = {}
    for m in dict.fromkeys(r["modality"] for r in records):
        for top in best(list(records), m, budget, 3):
            out.setdefault(m, {})[top["method"]] = {r["budget_minutes"]: r for r in records if r.get("state") == "done"
                                                    and (r["method"], r["modality"]) == (top["method"], m)}
    return out


def budget_table(records: Sequence[Mapping[str, Any]], budget: float) -> list[str]:
    """The plot's figures: mean linear accuracy (%) and steps of the best three per modality at each budget."""
    budgets = sorted({r["budget_minutes"] for r in records if r.get("state") == "done"})
    head = ["modality", "method", *(f"{b:g} min" for b in budgets)]
    rows = ["The plotted figures: mean linear accuracy over the modality's probe columns, in %, with the steps "
            "reached (one seed per cell).", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for m, methods in budget_points(records, budget).items():
        for method, cells in methods.items():
            figs = [f"{100 * score(cells[b]):.2f} ({cells[b].get('steps', '-')} steps)" if b in cells else "-"
                    for b in budgets]
            rows.append("| " + " | ".join([m, method, *figs]) + " |")
    return [*rows, ""]


def budget_figure(records: Sequence[Mapping[str, Any]], budget: float, path: Path) -> bool:
    """Mean linear accuracy against budget of the best three per modality; False when no method has 2 budgets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for m, methods in budget_points(records, budget).items():
        for method, cells in methods.items():
            if len(cells) > 1:
                series.setdefault(m, {})[method] = sorted((b, 100 * score(r)) for b, r in cells.items())
    if not series:
        return False
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.8), squeeze=False)
    for ax, (modality, lines) in zip(axes[0], series.items()):
        for method, pts in lines.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
        ax.set(xlabel="training budget (minutes)", ylabel="mean linear accuracy (%)", title=modality)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def write_doc(records: Sequence[Mapping[str, Any]], baselines: Sequence[Mapping[str, Any]], out: Path, command: str,
              budget: float) -> list[Path]:
    """Write the doc (and the plot when --budgets cells exist) atomically; returns the paths written."""
    plot = out.with_name(f"{out.stem}_budget.png")
    has_plot = budget_figure(records, budget, plot)
    text = format_doc(records, baselines, command, budget, machine_note(records), plot.name if has_plot else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    return [out, *([plot] if has_plot else [])]
