"""Suite-specific analyses for the report: design sweeps beside the paper, the scaling-law fit, and
retrieval health (two-stage recall against exact, share of value rows read) over training.

Inputs are the committed results: `results/<suite>/<run>.json` summaries (grouped by `group`,
one entry per seed) and their `.metrics.jsonl` logs. Nothing here trains or invents a number:
a group without finished runs is reported as not finished.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

_MEM_KEY = re.compile(r"^mem(\d+)_(recall|rows_used|rows_read_train|top10pct_reads)$")
_SCALING_GROUP = re.compile(r"^sp(\d+)-x(\d+)$")  # sp<sparsity>-x<sparse/dense ratio>


def separated(a: list[float], b: list[float]) -> str:
    """Whether two groups' seed ranges are disjoint: the plain test of "beyond seed noise" this
    report uses (with 2 seeds a group's range is all we know of its noise)."""
    if len(a) < 2 or len(b) < 2:
        return "n/a (1 seed)"
    if max(a) < min(b) or max(b) < min(a):
        return "yes (ranges disjoint)"
    return "no (ranges overlap)"


def eval_records(root: Path, suite: str, run: dict) -> list[dict]:
    """The eval records of one finished run, each with a `tokens` field added."""
    # A run may belong to another suite (the sweeps and retrieval reports borrow main's runs).
    path = root / "results" / run.get("suite", suite) / f"{run['name']}.metrics.jsonl"
    tok_per_step = run["tokens"] / max(run["step"], 1)
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "eval":
            out.append({**rec, "tokens": rec["step"] * tok_per_step})
    return out


def new_figure(ncols: int = 1, width: float = 6.5):
    """(figure, axes) on the non-interactive backend (reports run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, 4.5))


def finish_figure(fig, axes, out: Path, xlabel: str | list[str], titles: list[str], ylim=None) -> Path:
    """Label (one x label for all, or one each), grid and legend every axis, then save and close."""
    import matplotlib.pyplot as plt

    xlabels = [xlabel] * len(axes) if isinstance(xlabel, str) else xlabel
    for ax, title, label in zip(axes, titles, xlabels, strict=True):
        ax.set_xlabel(label)
        ax.set_title(title)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ------------------------------------------------------------------ sweeps

def sweeps_table(groups: dict[str, list[dict]], base: list[dict], paper: dict[str, float]) -> str:
    """One row per sweep point: its change, FLOPs beside the base's, val loss and delta vs base."""
    head = ["run", "seeds", "MFLOP/token", "FLOPs vs base", "val loss", "Δ vs base", "beyond seed noise?",
            "paper Δ vs base (151M, C4)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base_loss = statistics.fmean(r["val_loss"] for r in base) if base else None
    base_flops = base[0]["params"]["flops_per_token"] if base else None
    rows = [("base E4-r2-h2 (= main ultramem)", base)] + sorted(groups.items())
    for name, rs in rows:
        ref = paper.get(name)
        ref_s = "-" if ref is None else f"{ref:+.3f}"
        if not rs:
            lines.append(f"| {name} | not finished | | | | | | {ref_s} |")
            continue
        flops = rs[0]["params"]["flops_per_token"]
        losses = [r["val_loss"] for r in rs]
        mean = statistics.fmean(losses)
        spread = f" ± {(max(losses) - min(losses)) / 2:.3f}" if len(rs) > 1 else ""
        rel = "-" if base_flops is None else f"{100 * (flops / base_flops - 1):+.1f}%"
        delta = "-" if base_loss is None or rs is base else f"{mean - base_loss:+.3f}"
        noise = "-" if base_loss is None or rs is base else separated(losses, [r["val_loss"] for r in base])
        lines.append(f"| {name} | {len(rs)} | {flops / 1e6:.2f} | {rel} | {mean:.3f}{spread} | "
                     f"{delta} | {noise} | {ref_s} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ scaling

def fit_log_linear(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least squares y = a + b ln(x): slope b, intercept a, b per doubling, slope std error, R^2."""
    if len(xs) != len(ys) or len(set(xs)) < 2:
        raise ValueError(f"fit: need >= 2 distinct x values, got {sorted(set(xs))}")
    lx = [math.log(x) for x in xs]
    mx, my = statistics.fmean(lx), statistics.fmean(ys)
    sxx = sum((v - mx) ** 2 for v in lx)
    b = sum((u - mx) * (v - my) for u, v in zip(lx, ys, strict=True)) / sxx
    a = my - b * mx
    resid = [v - (a + b * u) for u, v in zip(lx, ys, strict=True)]
    sst = sum((v - my) ** 2 for v in ys)
    r2 = 1 - sum(e * e for e in resid) / sst if sst > 0 else float("nan")
    dof = len(xs) - 2
    se = math.sqrt(sum(e * e for e in resid) / dof / sxx) if dof > 0 else float("nan")
    return {"slope": b, "intercept": a, "per_doubling": b * math.log(2), "slope_se": se,
            "r2": r2, "points": len(xs)}


def scaling_points(groups: dict[str, list[dict]], seed: int | None = None
                   ) -> dict[int, list[tuple[float, float]]]:
    """{sparsity: [(sparse params, val loss) per finished seed]} from groups named sp<S>-x<R>;
    only the given seed's runs when `seed` is set."""
    out: dict[int, list[tuple[float, float]]] = {}
    for name, rs in groups.items():
        m = _SCALING_GROUP.match(name)
        if m:
            out.setdefault(int(m.group(1)), []).extend(
                (r["params"]["sparse"], r["val_loss"]) for r in rs if seed is None or r["seed"] == seed)
    return out


def _per_seed_slopes(groups: dict[str, list[dict]], sparsity: int) -> str:
    """Each seed's own fit, so the spread of the slope across seeds is visible beside the pooled one."""
    seeds = sorted({r["seed"] for name, rs in groups.items() if name.startswith(f"sp{sparsity}-")
                    for r in rs})
    cells = []
    for seed in seeds:
        pts = scaling_points(groups, seed).get(sparsity, [])
        if len({x for x, _ in pts}) >= 2:
            f = fit_log_linear([x for x, _ in pts], [y for _, y in pts])
            cells.append(f"s{seed} {f['per_doubling']:+.4f} ({len(pts)} sizes)")
        else:
            cells.append(f"s{seed} {len(pts)} size(s), no fit")
    return ", ".join(cells)


def scaling_table(groups: dict[str, list[dict]]) -> str:
    """The slope of val loss against ln(sparse params) at each sparsity (all seeds as points)."""
    lines = ["| sparsity (rows / rows read a token) | points | slope per e-fold | per doubling | "
             "R^2 | per doubling, each seed alone |", "|---|---|---|---|---|---|"]
    for sparsity, pts in sorted(scaling_points(groups).items()):
        if len({x for x, _ in pts}) < 2:
            lines.append(f"| {sparsity} | {len(pts)} | too few sizes finished | | | |")
            continue
        f = fit_log_linear([x for x, _ in pts], [y for _, y in pts])
        se = "" if math.isnan(f["slope_se"]) else f" ± {f['slope_se']:.4f}"
        lines.append(f"| {sparsity} | {f['points']} | {f['slope']:+.4f}{se} | "
                     f"{f['per_doubling']:+.4f} | {f['r2']:.2f} | {_per_seed_slopes(groups, sparsity)} |")
    return "\n".join(lines)


def sparsity_table(groups: dict[str, list[dict]]) -> str:
    """Each sparsity against the sparsest one at every ratio: per-seed losses, mean, the Δ over the
    seeds both have and whether it is beyond seed noise (the disjoint-range test of every table)."""
    by: dict[int, dict[int, list[dict]]] = {}  # {ratio: {sparsity: runs}}
    for name, rs in groups.items():
        m = _SCALING_GROUP.match(name)
        if m:  # an empty group (configured, not finished) still gets its row
            by.setdefault(int(m.group(2)), {})[int(m.group(1))] = rs
    sparsities = sorted({sp for per in by.values() for sp, rs in per.items() if rs}, reverse=True)
    if len(sparsities) < 2:
        return ""
    ref = sparsities[0]
    head = ["sparse / dense"] + [f"sparsity {sp}: val loss per seed" for sp in sparsities]
    for sp in sparsities[1:]:
        head += [f"Δ {sp} - {ref}", "beyond seed noise?"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(rs):
        if not rs:
            return "not finished"
        losses = [r["val_loss"] for r in rs]
        seeds = ", ".join(f"s{r['seed']} {r['val_loss']:.3f}" for r in sorted(rs, key=lambda r: r["seed"]))
        spread = f" ± {(max(losses) - min(losses)) / 2:.3f}" if len(rs) > 1 else ""
        return f"{seeds} (mean {statistics.fmean(losses):.3f}{spread})"

    for ratio, per in sorted(by.items()):
        row = [f"x{ratio}"] + [cell(per.get(sp, [])) for sp in sparsities]
        for sp in sparsities[1:]:
            a, b = per.get(sp, []), per.get(ref, [])
            shared = {r["seed"] for r in a} & {r["seed"] for r in b}
            if shared:  # Δ over the seeds both have, as in the ablation table
                da = statistics.fmean(r["val_loss"] for r in a if r["seed"] in shared)
                db = statistics.fmean(r["val_loss"] for r in b if r["seed"] in shared)
                delta = round(da - db, 3) + 0.0  # + 0.0 turns -0.0 into 0.0: no "-0.000"
                row += [f"{delta:+.3f}", separated([r["val_loss"] for r in a], [r["val_loss"] for r in b])]
            else:
                row += ["-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_scaling(groups: dict[str, list[dict]], out: Path) -> Path | None:
    pts_by = scaling_points(groups)
    if not pts_by:
        return None
    fig, ax = new_figure()
    for sparsity, pts in sorted(pts_by.items()):
        line = ax.plot([x / 1e6 for x, _ in pts], [y for _, y in pts], "o", label=f"sparsity {sparsity}")
        if len({x for x, _ in pts}) >= 2:
            f = fit_log_linear([x for x, _ in pts], [y for _, y in pts])
            xs = sorted({x for x, _ in pts})
            ax.plot([x / 1e6 for x in xs], [f["intercept"] + f["slope"] * math.log(x) for x in xs],
                    "-", color=line[0].get_color(), alpha=0.6,
                    label=f"fit: {f['per_doubling']:+.3f} per doubling")
    ax.set_xscale("log", base=2)
    ticks = sorted({x / 1e6 for pts in pts_by.values() for x, _ in pts})
    ax.set_xticks(ticks, [f"{t:.1f}" for t in ticks])  # the measured sizes, not powers of 10
    ax.minorticks_off()
    ax.set_ylabel("val loss")
    return finish_figure(fig, [ax], out, "sparse (value) params (M, log scale)",
                         ["scaling: val loss vs sparse params at fixed sparsity"])


# ------------------------------------------------------------------ retrieval

def memory_curves(root: Path, suite: str, runs: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """{"mem0_recall": [(tokens, mean over seeds), ...], ...} for the memory metrics a group logs."""
    per_seed = [eval_records(root, suite, r) for r in runs]
    n = min((len(recs) for recs in per_seed), default=0)
    keys = sorted({k for recs in per_seed for rec in recs for k in rec if _MEM_KEY.match(k)})
    out = {}
    for key in keys:
        pts = []
        for i in range(n):
            vals = [recs[i][key] for recs in per_seed if key in recs[i]]
            if vals:
                pts.append((per_seed[0][i]["tokens"], statistics.fmean(vals)))
        out[key] = pts
    return out


# A layer whose training batches read under half of its value rows in the last eval interval has
# collapsed onto a few keys: every run that did (ablation rung 7, rungs 5-6 of the first ablation
# attempt, one calibrated-init seed) is 0.1-0.5 behind its neighbours; healthy UltraMem layers read
# 84-99%, PKM layers 60-98% (EXPERIMENTS.md, "collapse").
COLLAPSED_BELOW = 0.5


def collapsed_seeds(runs: list[dict], layer: int) -> str:
    """"-" (not logged), "no", or the seeds whose layer read < COLLAPSED_BELOW of its rows in training."""
    key = f"mem{layer}_rows_read_train"
    logged = [r for r in runs if r.get(key) is not None]
    if not logged:
        return "-"
    bad = [str(r.get("seed")) for r in logged if r[key] < COLLAPSED_BELOW]
    return f"seed {', '.join(bad)}" if bad else "no"


def retrieval_table(root: Path, suite: str, groups: dict[str, list[dict]]) -> str:
    """Per memory group and layer, first eval -> last: recall vs exact, share of value rows read on
    val, and (runs that log it) share read by the training batches of the last eval interval, the
    share of those reads taken by the most-read 10% of rows, and which seeds collapsed."""
    lines = ["| run | seeds | layer | recall vs exact | rows read on val | rows read in training "
             f"(last interval) | reads to the top 10% of rows | collapsed (< {COLLAPSED_BELOW:.0%} of "
             "rows read in training) |", "|---|---|---|---|---|---|---|---|"]

    def span(pts):
        return "-" if not pts else f"{pts[0][1]:.3f} → {pts[-1][1]:.3f}"

    found = False
    for name in sorted(groups):
        curves = memory_curves(root, suite, groups[name])
        layers = sorted({int(_MEM_KEY.match(k).group(1)) for k in curves})
        for i in layers:
            rec, used = curves.get(f"mem{i}_recall", []), curves.get(f"mem{i}_rows_used", [])
            if not rec or not used:
                continue
            found = True
            lines.append(f"| {name} | {len(groups[name])} | {i} | {span(rec)} | {span(used)} | "
                         f"{span(curves.get(f'mem{i}_rows_read_train'))} | "
                         f"{span(curves.get(f'mem{i}_top10pct_reads'))} | "
                         f"{collapsed_seeds(groups[name], i)} |")
    return "\n".join(lines) if found else ""


def plot_retrieval(root: Path, suite: str, groups: dict[str, list[dict]], out: Path) -> Path | None:
    fig, (ax_r, ax_u) = new_figure(2, 12)
    drawn = False
    for name in sorted(groups):
        for key, pts in memory_curves(root, suite, groups[name]).items():
            if key.endswith("top10pct_reads"):
                continue
            ax = ax_r if key.endswith("recall") else ax_u
            layer = key.split("_")[0]
            train_side = key.endswith("rows_read_train")
            where = " (training)" if train_side else " (val)" if ax is ax_u else ""
            ax.plot([t / 1e6 for t, _ in pts], [v for _, v in pts], marker="o", ms=3,
                    linestyle="--" if train_side else "-", label=f"{name} {layer}{where}")
            drawn = True
    if not drawn:
        import matplotlib.pyplot as plt

        plt.close(fig)
        return None
    return finish_figure(fig, [ax_r, ax_u], out, "tokens (M)",
                         [f"{suite}: two-stage recall vs exact top-m", f"{suite}: share of value rows read"],
                         ylim=(0, 1.02))
