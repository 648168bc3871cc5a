"""Loss curves of one or more runs (their metrics.jsonl) to a PNG.

Uses matplotlib's object API with the Agg canvas directly, so it never touches pyplot's global
backend state and works on machines without a display.
"""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PANELS = {"loss": "train loss", "val_loss": "val loss", "fact_acc": "fact-recall accuracy",
          "tokens_per_s": "train tokens/s"}


def _records(run) -> list[dict]:
    p = Path(run)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.is_file():
        raise ValueError(f"run: no metrics log at '{p}'")
    recs = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{n}: not a JSON line ({e})") from e
    return recs


def series(run, metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric; train-loss points are per step when the log has them."""
    steps, values = [], []
    for r in _records(run):
        if metric == "loss" and r.get("kind") == "train" and "losses" in r:
            first = r["step"] - len(r["losses"]) + 1
            steps += range(first, r["step"] + 1)
            values += r["losses"]
        elif metric in r and r.get("kind") in ("train", "eval"):
            steps.append(r["step"])
            values.append(r[metric])
    return steps, values


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_runs(runs, out_png, metrics=("loss", "val_loss"), labels=None, smooth: int = 10) -> Path:
    """One panel per metric, one line per run; returns the PNG path."""
    runs = [Path(r) for r in runs]
    if not runs:
        raise ValueError("runs: need at least one run directory")
    bad = [m for m in metrics if m not in PANELS]
    if bad:
        raise ValueError(f"metrics: unknown {bad}; allowed are {sorted(PANELS)}")
    labels = list(labels) if labels else [r.name if r.is_dir() else r.parent.name for r in runs]
    fig = Figure(figsize=(5.5 * len(metrics), 4), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        for run, label in zip(runs, labels, strict=True):
            steps, values = series(run, metric)
            if not steps:
                continue
            if metric == "loss" and smooth > 1:
                ax.plot(steps, values, alpha=0.2, lw=0.8)
                ax.plot(steps, _smooth(values, smooth), label=label, color=ax.lines[-1].get_color())
            else:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=label)
        ax.set_xlabel("step")
        ax.set_title(PANELS[metric])
        if metric == "loss":  # the first steps' drop would flatten everything after it
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
