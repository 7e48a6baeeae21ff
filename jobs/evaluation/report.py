"""Evaluation reports: the accuracy table and the plots (accuracy against step, loss curve)."""
from __future__ import annotations

import os
import tempfile
from typing import Any, Mapping, Optional

from selfsup.jobs.evaluation.results import read_rows
from selfsup.pipeline import storage
from selfsup.trainers import run_folder


def latest_table(run_dir: str, opts: Optional[Mapping[str, Any]] = None) -> list[dict[str, Any]]:
    """One row per (eval set, target, method): the latest pretrained step beside the baselines."""
    rows = read_rows(run_dir, opts)
    if not rows:
        return []
    pre = [r for r in rows if r["encoder"] == "pretrained"]
    arch = max(pre, key=lambda r: (r["step"], r["time"]))["arch"] if pre else None
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: (r["step"], r["time"])):
        if r["encoder"] != "pretrained" and arch is not None and r["arch"] != arch:
            continue
        k = (r["eval_set"], r["target"], r["method"])
        entry = out.setdefault(k, {"eval_set": k[0], "target": k[1], "method": k[2]})
        entry[r["encoder"]] = r["accuracy"]
        if r["encoder"] == "pretrained":
            entry["step"] = r["step"]
        entry["n_test"] = r["n_test"]
    return [out[k] for k in sorted(out)]


SAW_LABELS_NOTE = ("* pretrained with labels (the objective had a supervised term on a labeled source, e.g. "
                   "s4l): not a self-supervised-only result")


def run_saw_labels(run_dir: str, opts: Optional[Mapping[str, Any]] = None) -> bool:
    """Whether the run's newest checkpoint says its encoder saw labels in pretraining (meta `saw_labels`)."""
    from selfsup.trainers import checkpoint as ck

    latest = ck.latest_checkpoint(run_dir, opts)
    return bool(ck.read_meta(latest, opts).get("saw_labels", False)) if latest else False


def format_table(rows: list[dict[str, Any]], saw_labels: bool = False) -> str:
    """The table as aligned text (accuracy in %); `saw_labels` marks the pretrained column and adds a note."""
    pre = "pretrained*" if saw_labels else "pretrained"
    head = f"{'eval set':<18} {'target':<8} {'method':<7} {'step':>6} {pre:>11} {'random init':>12} " \
           f"{'raw':>7} {'n_test':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        def pct(name: str) -> str:
            return f"{100 * r[name]:.2f}" if name in r else "-"
        lines.append(f"{r['eval_set']:<18} {r['target']:<8} {r['method']:<7} {r.get('step', '-'):>6} "
                     f"{pct('pretrained'):>11} {pct('random_init'):>12} {pct('raw'):>7} {r.get('n_test', 0):>7}")
    return "\n".join(lines + ([SAW_LABELS_NOTE] if saw_labels else []))


def print_table(run_dir: str, opts: Optional[Mapping[str, Any]] = None) -> None:
    """Print the latest accuracy table of a run."""
    rows = latest_table(run_dir, opts)
    print(format_table(rows, run_saw_labels(run_dir, opts)) if rows
          else f"no evaluation results in {storage.redact_url(run_dir)} yet")


def write_plots(run_dir: str, opts: Optional[Mapping[str, Any]] = None) -> list[str]:
    """`<run>/eval/accuracy.png` and `<run>/eval/loss.png`; returns the URLs written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = read_rows(run_dir, opts)
    with tempfile.TemporaryDirectory() as tmp:
        if rows:
            fig = accuracy_figure(plt, rows)
            written.append(_save(fig, plt, tmp, run_dir, "accuracy.png", opts))
        lines = run_folder.read_metrics(run_dir, opts)
        if lines:
            by_step = {m["step"]: m["loss"] for m in lines}
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.plot(sorted(by_step), [by_step[s] for s in sorted(by_step)])
            ax.set(xlabel="step", ylabel="training loss", title="pretraining loss")
            written.append(_save(fig, plt, tmp, run_dir, "loss.png", opts))
    return written


def accuracy_figure(plt: Any, rows: list[dict[str, Any]]) -> Any:
    """Accuracy against step per (eval set, target, method); baselines as horizontal lines."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = sorted({(r["eval_set"], r["target"], r["method"]) for r in rows})
    for i, g in enumerate(groups):
        color = f"C{i % 10}"
        pts = sorted((r["step"], r["accuracy"]) for r in rows if (r["eval_set"], r["target"], r["method"]) == g
                     and r["encoder"] == "pretrained")
        label = "/".join(g)
        if pts:
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", color=color, label=f"{label} pretrained")
        for enc, style in (("random_init", "--"), ("raw", ":")):
            base = [r["accuracy"] for r in rows if (r["eval_set"], r["target"], r["method"]) == g
                    and r["encoder"] == enc]
            if base:
                ax.axhline(100 * base[-1], linestyle=style, color=color, label=f"{label} {enc}")
    ax.set(xlabel="step", ylabel="accuracy (%)", title="frozen-feature accuracy")
    ax.legend(fontsize=7, loc="best")
    return fig


def _save(fig: Any, plt: Any, tmp: str, run_dir: str, name: str, opts: Optional[Mapping[str, Any]]) -> str:
    local = os.path.join(tmp, name)
    fig.tight_layout()
    fig.savefig(local, dpi=100)
    plt.close(fig)
    url = run_folder.eval_url(run_dir, name)
    storage.upload_file(local, url, opts)
    return url
