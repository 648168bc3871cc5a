"""Turn finished runs (experiments/results/<suite>/*.json + metrics) into markdown tables and plots.

Every table row is a group of seeds: mean and spread (max - min) over the seeds that finished.
Runs that have not finished are listed as such, never filled in.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from .analysis import separated  # noqa: F401  (used below; re-exported)
from .runner import status

# SPEC section 7: the paper's ablation (C4 val loss, 151M activated), change from the previous rung.
PAPER_ABLATION_DELTA = {
    "pkm": None, "rm-softmax": -0.006, "half-vdim-proj": -0.022, "share-query": +0.003,
    "split-skip": -0.015, "qk-norm": +0.001, "ive": -0.017, "tdqkr": -0.008, "mcs": -0.003,
    "improved-init": -0.003, "value-lr-decay": -0.022, "query-conv": 0.000,
}
# SPEC section 7 main table, smallest size (151M activated): val loss per kind.
PAPER_MAIN_151M = {"dense": 2.96, "moe": 2.63, "ultramem": 2.67, "pkm": None}
# SPEC section 7 sweeps, restated as changes from our sweep base (E=4, r=2, h=2): the paper gives
# E=4/9/16 vs E=1 (-0.017/-0.025/-0.027), r=2 and 3 vs r=1 (about -0.008 both), h=2/4 vs h=1
# (-0.003/+0.001).
PAPER_SWEEP_DELTA = {"ive-E1": +0.017, "ive-E9": -0.008, "ive-E16": -0.010, "rank-r1": +0.008,
                     "rank-r3": 0.0, "cores-h1": +0.003, "cores-h4": +0.004}
# The sweep base is exactly main's UltraMem config, so its runs are taken from there, not rerun.
SWEEP_BASE = ("main", "ultramem")


def configured_groups(root: Path, suite: str) -> list[str]:
    """Group names of the suite's committed configs, in name order (finished or not)."""
    from .runner import list_configs

    return sorted({json.loads(p.read_text()).get("group", p.stem) for p in list_configs(root, suite)})


def load_results(root: Path, suite: str) -> dict[str, list[dict]]:
    """Finished results by group; a result whose config has changed since it ran is left out."""
    from .runner import result_is_stale

    groups: dict[str, list[dict]] = defaultdict(list)
    for path in sorted((root / "results" / suite).glob("*.json")):
        cfg = root / "configs" / suite / path.name
        if cfg.exists() and result_is_stale(path, cfg):
            continue
        r = json.loads(path.read_text())
        groups[r["group"]].append(r)
    return groups


def _stat(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (max(values) - min(values) if len(values) > 1 else float("nan"))


def _fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    mean, spread = _stat(values)
    return f"{mean:.{digits}f}" + ("" if len(values) < 2 else f" ± {spread / 2:.{digits}f}")


def _versus_cells(rs: list[dict], ref: list[dict]) -> list[str]:
    """Δ of the mean val loss against a reference group and whether the seed ranges separate."""
    losses, ref_losses = [r["val_loss"] for r in rs], [r["val_loss"] for r in ref]
    if rs is ref:
        return ["+0.000", "-"]
    return [f"{statistics.fmean(losses) - statistics.fmean(ref_losses):+.3f}", separated(losses, ref_losses)]


def _paper_cell(name: str, paper: dict) -> str:
    ref = paper.get(name.split("-", 1)[-1] if name[:2].isdigit() else name)
    if ref is not None and not name[:2].isdigit() and paper.get("dense") is not None:
        ref -= paper["dense"]  # the paper's gap to its dense model, comparable to ours
    return "-" if ref is None else f"{ref:+.3f}"


def group_table(groups: dict[str, list[dict]], order: list[str] | None = None,
                paper: dict | None = None, paper_label: str = "paper",
                versus: tuple[str, ...] = ("dense",)) -> str:
    """One row per group: params, FLOPs, tokens, val loss, fact recall (if any), train tokens/s, and
    the val-loss gap to each reference group in `versus` that has results (the fact-corpus suites
    name theirs "facts-<kind>"), with the seed-noise verdict."""
    has_facts = any("fact_acc" in r for rs in groups.values() for r in rs)
    head = ["run", "seeds", "total params", "activated", "MFLOP/token", "tokens", "val loss"]
    head += ["fact acc (seen)", "fact acc (held-out)"] if has_facts else []
    refs = {}
    for kind in versus:
        ref = groups.get(kind) or groups.get(f"facts-{kind}")
        if ref:
            refs[kind] = ref
    head += ["train tok/s"]
    for kind in refs:
        head += [f"Δ val loss vs {kind}", "beyond seed noise?"]
    head += [paper_label] if paper else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in order or sorted(groups):
        rs = groups.get(name, [])
        if not rs:
            lines.append(f"| {name} | not finished |" + " |" * (len(head) - 2))
            continue
        p = rs[0]["params"]
        row = [name, str(len(rs)), f"{p['total'] / 1e6:.2f}M", f"{p['activated'] / 1e6:.3f}M",
               f"{p['flops_per_token'] / 1e6:.2f}", f"{rs[0]['tokens'] / 1e6:.1f}M",
               _fmt([r["val_loss"] for r in rs])]
        if has_facts:
            row += [_fmt([r.get("fact_acc_seen", float("nan")) for r in rs], 3),
                    _fmt([r.get("fact_acc_heldout", float("nan")) for r in rs], 3)]
        row.append(f"{statistics.fmean(r['tokens_per_s'] for r in rs):,.0f}")
        for ref in refs.values():
            row += _versus_cells(rs, ref)
        if paper:
            row.append(_paper_cell(name, paper))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def ablation_table(groups: dict[str, list[dict]], names: list[str] | None = None) -> str:
    """The ladder: our val loss and its change from the previous rung beside the paper's change.
    A rung (or its predecessor) that has not finished gets no delta, never an invented one."""
    lines = ["| rung | seeds | val loss | our delta | beyond seed noise? | paper delta |",
             "|---|---|---|---|---|---|"]
    prev = None
    for name in names or sorted(groups):
        rs = groups.get(name, [])
        rung = name.split("-", 1)[1]
        ref = PAPER_ABLATION_DELTA.get(rung)
        ref_s = "-" if ref is None else f"{ref:+.3f}"
        if not rs:
            lines.append(f"| {name} | not finished | | | | {ref_s} |")
            prev = None
            continue
        losses = [r["val_loss"] for r in rs]
        ours = "-" if prev is None else f"{statistics.fmean(losses) - statistics.fmean(prev):+.3f}"
        noise = "-" if prev is None else separated(losses, prev)
        lines.append(f"| {name} | {len(rs)} | {_fmt(losses)} | {ours} | {noise} | {ref_s} |")
        prev = losses
    return "\n".join(lines)


def plot_curves(root: Path, suite: str, groups: dict[str, list[dict]], out: Path, prefix: str = "") -> Path:
    """Train loss (smoothed) and val loss against tokens, mean over seeds, one line per group."""
    from .analysis import finish_figure, new_figure

    fig, (ax_t, ax_v) = new_figure(2, 12)
    for name in sorted(groups):
        if not name.startswith(prefix) or (not prefix and name.startswith("facts-")):
            continue
        curves_t, curves_v = [], []
        for r in groups[name]:
            path = root / "results" / r.get("suite", suite) / f"{r['name']}.metrics.jsonl"
            recs = [json.loads(line) for line in path.read_text().splitlines()]
            curves_t.append([(x["tokens"], x["loss"]) for x in recs if x.get("kind") == "train"])
            tok_per_step = r["tokens"] / max(r["step"], 1)
            curves_v.append([(x["step"] * tok_per_step, x["val_loss"])
                             for x in recs if x.get("kind") == "eval"])
        for ax, curves in ((ax_t, curves_t), (ax_v, curves_v)):
            n = min(len(c) for c in curves)
            if n == 0:
                continue
            xs = [curves[0][i][0] / 1e6 for i in range(n)]
            ys = [statistics.fmean(c[i][1] for c in curves) for i in range(n)]
            ax.plot(xs, ys, label=name, marker="o" if ax is ax_v else None, ms=3)
    ax_t.set_ylim(top=min(ax_t.get_ylim()[1], 8))
    label = f"{suite} {prefix.rstrip('-')}".strip()
    return finish_figure(fig, [ax_t, ax_v], out, "tokens (M)",
                         [f"{label}: train loss (mean over seeds)", f"{label}: val loss (mean over seeds)"])


def _suite_sections(root: Path, suite: str, groups: dict[str, list[dict]], out_dir: Path) -> list[str]:
    """The tables and plots only one suite has (ablation, sweeps, scaling, capacity)."""
    from . import analysis

    parts: list[str] = []
    if suite == "ablation":
        parts += [ablation_table(groups, configured_groups(root, suite)), ""]
    if suite == "sweeps":
        base = load_results(root, SWEEP_BASE[0]).get(SWEEP_BASE[1], []) if (
            root / "results" / SWEEP_BASE[0]).is_dir() else []
        every = {g: groups.get(g, []) for g in configured_groups(root, suite)}
        parts += [analysis.sweeps_table(every, base, PAPER_SWEEP_DELTA), ""]
    if suite == "scaling":
        parts += ["Fit of val loss = a + b ln(sparse params), every finished seed a point:", "",
                  analysis.scaling_table(groups), ""]
        sp_table = analysis.sparsity_table({**{g: [] for g in configured_groups(root, suite)}, **groups})
        parts += ["Sparsities side by side at each ratio:", "", sp_table, ""] if sp_table else []
        png = analysis.plot_scaling(groups, out_dir / "scaling_fit.png")
        parts += [f"![scaling fit]({png.name})", ""] if png else []
    if suite == "capacity":
        from . import capacity

        parts += ["Fact recall rate in the main job's budget, mean ± half the seed range (in brackets: "
                  "facts stored, the rate corrected for guessing: see experiments/capacity.py); memory "
                  "kinds against dense (Δ of the rate, beyond seed noise?):", "",
                  capacity.capacity_table(groups, configured=configured_groups(root, suite)), ""]
        png = capacity.plot_capacity(root, suite, groups, out_dir / "capacity.png")
        parts += [f"![capacity curves]({png.name})", ""] if png else []
    return parts


def write_report(root: Path, suite: str) -> Path:
    """results/<suite>.md with the tables, plots beside it, and the list of unfinished runs."""
    from . import analysis, ood

    groups = load_results(root, suite)
    if suite == "retrieval" and (root / "results" / "main").is_dir():
        main = load_results(root, "main")  # the counterparts this suite is compared against
        groups = {**{k: v for k, v in main.items() if k in ("dense", "pkm", "ultramem")}, **groups}
    out_dir = root / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    st = status(root, suite)
    parts = [f"# Suite `{suite}`", ""] + _suite_sections(root, suite, groups, out_dir)
    text_groups = {k: v for k, v in groups.items() if not k.startswith("facts-")}
    fact_groups = {k: v for k, v in groups.items() if k.startswith("facts-")}
    main_like = suite in ("main", "fair")  # the matched comparisons: dense, MoE, PKM, UltraMem, V2
    paper = PAPER_MAIN_151M if main_like else PAPER_ABLATION_DELTA if suite == "ablation" else None
    versus = ("dense", "moe") if main_like else ("dense",)
    if text_groups:
        label = ("paper Δ vs dense (C4, 151M activated, 1T tokens)" if main_like
                 else "paper Δ from previous rung")
        order = sorted(set(text_groups) | {g for g in configured_groups(root, suite)
                                           if not g.startswith("facts-")})
        parts += [group_table(text_groups, order=order, paper=paper, paper_label=label,
                                  versus=versus), ""]
        if suite != "capacity":  # its curves are the capacity plot
            png = plot_curves(root, suite, groups, out_dir / f"{suite}_loss.png")
            parts += [f"![{suite} loss curves]({png.name})", ""]
    if fact_groups:
        order = sorted(set(fact_groups) | {g for g in configured_groups(root, suite)
                                           if g.startswith("facts-")})
        parts += ["Generated fact corpus:", "", group_table(fact_groups, order=order, versus=versus), ""]
        png = plot_curves(root, suite, groups, out_dir / f"{suite}_facts_loss.png", prefix="facts-")
        parts += [f"![{suite} fact-corpus loss curves]({png.name})", ""]
    parts += ood.ood_sections(root, suite)
    table = analysis.retrieval_table(root, suite, groups)
    if table:
        parts += ["Retrieval health (mean over seeds; recall = share of the exact top-m slots the "
                  "layer's own search returns, on the first 32 val tokens; rows read = union over the "
                  "val windows):", "", table, ""]
        png = analysis.plot_retrieval(root, suite, groups, out_dir / f"{suite}_retrieval.png")
        parts += [f"![{suite} retrieval]({png.name})", ""] if png else []
    unfinished = st["running"] + st["started"] + st["pending"] + [f"{n} (stale: config changed)"
                                                                  for n in st["stale"]]
    parts += [f"Finished runs: {len(st['done'])}; not finished: "
              + (", ".join(unfinished) if unfinished else "none") + "."]
    path = out_dir / f"{suite}.md"
    path.write_text("\n".join(parts) + "\n")
    return path
