"""Knowledge capacity (the `capacity` suite): facts recalled against facts in the corpus, per kind.

Groups are named `<kind>-p<people>` (suites.capacity_suite); every person has `len(attributes)`
facts. "Facts stored" corrects a recall rate r for guessing: with c the majority-answer baseline of the
same questions (data/facts.py `fact_recall_report`), a model that knows k of F facts and answers
the rest like the baseline scores r = k/F + (1 - k/F) c, so k = F (r - c) / (1 - c) (0 at or
below chance). The rates come from the run's recall questions (a fair sample of all facts), so k
is an estimate with the sample's error (about +-0.02 of the rate at 300 questions a kind).
"""

from __future__ import annotations

import functools
import json
import re
import statistics
from pathlib import Path

from .analysis import eval_records, finish_figure, new_figure, separated

_GROUP = re.compile(r"^(?P<kind>[a-z0-9-]+)-p(?P<people>\d+)$")
RATES = (("fact_acc_seen", "seen phrasings"), ("fact_acc_heldout", "held-out phrasings"))


def facts_per_person(run: dict) -> int:
    from ..data.config import DEFAULT_ATTRIBUTES

    return len(run["spec"]["data"].get("fact_attributes", DEFAULT_ATTRIBUTES))


def chance_rates(run: dict) -> dict[str, float]:
    """The majority-answer baseline of the run's own recall questions, seen and held-out apart."""
    spec = run["spec"]
    return dict(_chance_rates(json.dumps(spec["data"], sort_keys=True), spec["train"]["fact_queries"]))


@functools.lru_cache(maxsize=64)
def _chance_rates(data_json: str, n_queries: int) -> tuple[tuple[str, float], ...]:
    """Cached: every kind of a corpus size asks the same questions, and rebuilding the corpus for
    each table cell and plot point repeats the same work."""
    from ..data.config import DataConfig
    from ..data.facts import build_fact_corpus, fact_recall_report

    queries = build_fact_corpus(DataConfig.from_dict(json.loads(data_json)).fact_config()).queries
    queries = queries[:n_queries]
    out = {}
    for key, heldout in (("fact_acc_seen", False), ("fact_acc_heldout", True)):
        part = [q for q in queries if q.heldout == heldout]
        out[key] = fact_recall_report(part, [""] * len(part))["chance"]
    return tuple(out.items())


def stored(rate: float, chance: float, facts: int) -> float:
    return max(0.0, (rate - chance) / (1 - chance)) * facts


def capacity_points(groups: dict[str, list[dict]]) -> dict[str, dict[int, list[dict]]]:
    """{kind: {people: finished runs}} for the groups named like the capacity suite's."""
    out: dict[str, dict[int, list[dict]]] = {}
    for name, runs in groups.items():
        m = _GROUP.match(name)
        if m and runs:
            out.setdefault(m["kind"], {})[int(m["people"])] = runs
    return out


def _cell(runs: list[dict], key: str, chance: float) -> str:
    xs = [r[key] for r in runs]
    facts = facts_per_person(runs[0]) * runs[0]["spec"]["data"]["num_people"]
    mean = statistics.fmean(xs)
    spread = f" ± {(max(xs) - min(xs)) / 2:.3f}" if len(xs) > 1 else ""
    return f"{mean:.3f}{spread} ({stored(mean, chance, facts):,.0f})"


def capacity_table(groups: dict[str, list[dict]], against: str = "dense",
                   configured: list[str] | None = None) -> str:
    """One row per corpus size: the guessing baseline, each kind's recall rate (facts stored), seen
    and held-out; and whether each memory kind is separated from `against` beyond seed noise
    (disjoint seed ranges of the rate). A size a kind has no run for reads "not finished" when
    `configured` (the suite's group names) has it, "-" (not in the suite) otherwise."""
    pts = capacity_points(groups)
    kinds = sorted(pts, key=lambda k: (k != against, k))
    sizes = sorted({p for by in pts.values() for p in by})
    head = ["people", "facts", "chance (seen / held-out)"]
    head += [f"{k}: {label}" for k in kinds for _, label in RATES]
    others = [k for k in kinds if k != against]
    head += [f"{k} vs {against} (seen / held-out)" for k in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for people in sizes:
        any_run = next(by[people][0] for by in pts.values() if people in by)
        chance = chance_rates(any_run)
        row = [f"{people:,}", f"{people * facts_per_person(any_run):,}",
               " / ".join(f"{chance[key]:.3f}" for key, _ in RATES)]
        row += [_cell(pts[k][people], key, chance[key]) if people in pts[k]
                else "not finished" if configured is None or f"{k}-p{people:04d}" in configured else "-"
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


def curve_size(pts: dict[str, dict[int, list[dict]]], kind: str = "dense") -> int:
    """The corpus size for the recall-vs-step panel: the smallest at which `kind` recalls under half
    of the facts (seen phrasings), where the kinds still differ; else the largest size."""
    sizes = sorted({p for by in pts.values() for p in by})
    short = [p for p, rs in sorted(pts.get(kind, {}).items())
             if statistics.fmean(r["fact_acc_seen"] for r in rs) < 0.5]
    return short[0] if short else sizes[-1]


def plot_capacity(root: Path, suite: str, groups: dict[str, list[dict]], out: Path) -> Path | None:
    """Facts stored vs facts in the corpus (seen, held-out; every seed a point, the mean a line),
    and recall vs training step at `curve_size`."""
    pts = capacity_points(groups)
    if not pts:
        return None
    fig, axes = new_figure(ncols=3, width=15)
    curve_at = curve_size(pts)
    for kind, by in sorted(pts.items()):
        sizes = sorted(by)
        facts = [p * facts_per_person(by[p][0]) for p in sizes]
        chance = [chance_rates(by[p][0]) for p in sizes]
        for ax, (key, _) in zip(axes[:2], RATES, strict=True):
            means = [stored(statistics.fmean(r[key] for r in by[p]), c[key], f)
                     for p, f, c in zip(sizes, facts, chance, strict=True)]
            line = ax.plot(facts, means, "-", label=kind)
            for p, f, c in zip(sizes, facts, chance, strict=True):
                ax.plot([f] * len(by[p]), [stored(r[key], c[key], f) for r in by[p]], "o", ms=3,
                        color=line[0].get_color())
        if curve_at in by:
            curves = [eval_records(root, suite, r) for r in by[curve_at]]
            steps = [rec["step"] for rec in curves[0] if "fact_acc_seen" in rec]
            mean = [statistics.fmean(c[i]["fact_acc_seen"] for c in curves) for i in range(len(steps))]
            axes[2].plot(steps, mean, "o-", label=kind)
    ticks = sorted({p * facts_per_person(rs[0]) for by in pts.values() for p, rs in by.items()})
    for ax in axes[:2]:
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{t:,}" for t in ticks])  # the measured sizes
        ax.minorticks_off()
        ax.set_ylabel("facts stored (recall corrected for guessing)")
    axes[2].set_ylabel("recall rate, seen phrasings")
    return finish_figure(fig, axes, out, ["facts in the corpus (log scale)"] * 2 + ["training step"],
                         ["seen phrasings", "held-out phrasings", f"recall vs step, {curve_at:,} people"])
