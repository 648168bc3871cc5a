"""Knowledge capacity (the `capacity` suite): facts recalled against facts in the corpus, per kind.

Groups are named `<kind>-p<people>` (suites.capacity_suite); every person has `len(attributes)`
facts. "Facts recalled" is a recall rate times the facts in the corpus: the rates come from the
run's recall questions (a fair sample of all facts, see data/facts.py), so a count is an estimate
with the sample's error (about +-0.02 of the rate at 300 questions a phrasing kind).
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path

from .analysis import eval_records, finish_figure, new_figure, separated

_GROUP = re.compile(r"^(?P<kind>[a-z0-9-]+)-p(?P<people>\d+)$")
RATES = (("fact_acc_seen", "seen phrasings"), ("fact_acc_heldout", "held-out phrasings"))


def facts_per_person(run: dict) -> int:
    from ..data.config import DEFAULT_ATTRIBUTES

    return len(run["spec"]["data"].get("fact_attributes", DEFAULT_ATTRIBUTES))


def capacity_points(groups: dict[str, list[dict]]) -> dict[str, dict[int, list[dict]]]:
    """{kind: {people: finished runs}} for the groups named like the capacity suite's."""
    out: dict[str, dict[int, list[dict]]] = {}
    for name, runs in groups.items():
        m = _GROUP.match(name)
        if m and runs:
            out.setdefault(m["kind"], {})[int(m["people"])] = runs
    return out


def _cell(runs: list[dict], key: str) -> str:
    xs = [r[key] for r in runs]
    facts = facts_per_person(runs[0]) * runs[0]["spec"]["data"]["num_people"]
    mean = statistics.fmean(xs)
    spread = f" ± {(max(xs) - min(xs)) / 2:.3f}" if len(xs) > 1 else ""
    return f"{mean:.3f}{spread} ({mean * facts:,.0f})"


def capacity_table(groups: dict[str, list[dict]], against: str = "dense") -> str:
    """One row per corpus size: each kind's recall rate (facts recalled), seen and held-out; and
    whether each memory kind is separated from `against` beyond seed noise (disjoint ranges)."""
    pts = capacity_points(groups)
    kinds = sorted(pts, key=lambda k: (k != against, k))
    sizes = sorted({p for by in pts.values() for p in by})
    head = ["people", "facts"] + [f"{k}: {label}" for k in kinds for _, label in RATES]
    others = [k for k in kinds if k != against]
    head += [f"{k} vs {against} (seen / held-out)" for k in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for people in sizes:
        any_run = next(by[people][0] for by in pts.values() if people in by)
        row = [f"{people:,}", f"{people * facts_per_person(any_run):,}"]
        row += [_cell(pts[k][people], key) if people in pts[k] else "not finished"
                for k in kinds for key, _ in RATES]
        base = pts.get(against, {}).get(people, [])
        for k in others:
            mine = pts[k].get(people, [])
            row.append(" / ".join(_versus([r[key] for r in mine], [r[key] for r in base])
                                  for key, _ in RATES))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _versus(mine: list[float], base: list[float]) -> str:
    if not mine or not base:
        return "-"
    delta = statistics.fmean(mine) - statistics.fmean(base)
    return f"{delta:+.3f} {separated(mine, base).split(' (')[0]}"


def plot_capacity(root: Path, suite: str, groups: dict[str, list[dict]], out: Path) -> Path | None:
    """Facts recalled vs facts in the corpus (seen, held-out; every seed a point, the mean a line),
    and recall vs training step on the largest corpus."""
    pts = capacity_points(groups)
    if not pts:
        return None
    fig, axes = new_figure(ncols=3, width=15)
    largest = max(p for by in pts.values() for p in by)
    for kind, by in sorted(pts.items()):
        sizes = sorted(by)
        facts = [p * facts_per_person(by[p][0]) for p in sizes]
        for ax, (key, _) in zip(axes[:2], RATES, strict=True):
            means = [statistics.fmean(r[key] for r in by[p]) * f for p, f in zip(sizes, facts, strict=True)]
            line = ax.plot(facts, means, "-", label=kind)
            for p, f in zip(sizes, facts, strict=True):
                ax.plot([f] * len(by[p]), [r[key] * f for r in by[p]], "o", ms=3, color=line[0].get_color())
        if largest in by:
            curves = [eval_records(root, suite, r) for r in by[largest]]
            steps = [rec["step"] for rec in curves[0] if "fact_acc_seen" in rec]
            mean = [statistics.fmean(c[i]["fact_acc_seen"] for c in curves) for i in range(len(steps))]
            axes[2].plot(steps, mean, "o-", label=kind)
    for ax in axes[:2]:
        ax.set_xscale("log")
        ax.set_ylabel("facts recalled")
    axes[2].set_ylabel("recall rate, seen phrasings")
    return finish_figure(fig, axes, out, ["facts in the corpus (log scale)"] * 2 + ["training step"],
                         ["seen phrasings", "held-out phrasings", f"recall vs step, {largest:,} people"])
