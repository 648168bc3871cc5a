"""`ultramem exp ...`: write suite configs, run a suite (foreground or background), report it."""

from __future__ import annotations

import argparse
from pathlib import Path

from .suites import PD_ENGLISH


def _with_progress(root, suite: str, name: str) -> str:
    from . import runner

    at = runner.progress(root, suite, name)
    return f"{name} (step {at[0]}/{at[1]})" if at else name


def _with_checkpoint(root, suite: str, name: str) -> str:
    """A stopped run resumes from its checkpoint, not from its last logged step."""
    from ..checkpoint import read_checkpoint_meta
    from . import runner

    at = runner.progress(root, suite, name)
    step = read_checkpoint_meta(Path(root) / "runs" / suite / name / "checkpoint.safetensors")["step"]
    return f"{name} (checkpoint at step {step}/{at[1]})" if at else name


def _ood(root: Path, names: list[str], a) -> None:
    from . import ood

    if not a.data:
        raise ValueError("--data: required by ood (a .txt file, folder or glob)")
    if a.max_tokens < 1:
        raise ValueError(f"--max-tokens: must be a positive int (got {a.max_tokens})")
    tag = a.tag or Path(a.data.rstrip("/")).stem
    if not tag.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"--tag: letters, digits, '-' and '_' only (got {tag!r})")
    for name in names:
        written = ood.evaluate_suite(root, name, a.data, tag, a.max_tokens)
        print(f"{name}: scored {len(written)} run(s) on {a.data} -> {ood.ood_dir(root, name, tag)}")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["configs", "run", "status", "report", "match", "probe", "ood"],
                   help="configs: write experiments/configs/<suite>/*.json; run: train unfinished runs; "
                        "status: done/running (its step)/started (its checkpoint)/pending; "
                        "report: tables and plots; match: re-count sizes; "
                        "probe: evaluate a trained UltraMem run (--run) under other top-m searches; "
                        "ood: score the finished text runs on another text (--data)")
    p.add_argument("suites", nargs="*", help="suite names (default: all for configs/report)")
    p.add_argument("--root", default="experiments", help="experiments folder (default: experiments)")
    p.add_argument("--pd-english", default=PD_ENGLISH,
                   help=f"configs: the pd-english corpus folder the text runs read (default {PD_ENGLISH})")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one process each (default 2)")
    p.add_argument("--only", nargs="+", help="run only configs whose name contains one of these")
    p.add_argument("--background", action="store_true", help="detach and log to <root>/logs/<suite>.log")
    g = p.add_argument_group("probe")
    g.add_argument("--run", help="run folder or checkpoint of an UltraMem model (probe)")
    g.add_argument("--search", nargs="+", choices=["rank1", "rank1_both_signs", "exact"],
                   help="searches to evaluate (default: all three)")
    g.add_argument("--stage1", nargs="+", type=int, help="also evaluate these stage1_topk (m1) values")
    g.add_argument("--windows", type=int, help="val windows (default: the run's eval_windows)")
    g = p.add_argument_group("ood")
    g.add_argument("--data", help="ood: a .txt file, folder or glob (e.g. experiments/ood/fortunes.sh's)")
    g.add_argument("--tag", help="ood: the text's name in results/<suite>/ood/ (default: the path's stem)")
    g.add_argument("--max-tokens", type=int, default=262_144,
                   help="ood: score the first this many tokens of each text (default 262,144)")


def handler(a) -> int:
    from . import report, runner, suites

    if a.action == "probe":
        if not a.run:
            raise ValueError("--run: required by probe (a run folder or checkpoint file)")
        from . import probe

        return probe.main(a)
    root = Path(a.root)
    names = a.suites or list(suites.SUITES)
    for name in names:
        if name not in suites.SUITES:
            raise ValueError(f"suite: unknown {name!r}; allowed are {sorted(suites.SUITES)}")
    if a.action == "configs":
        paths = suites.write_configs(root / "configs", names, pd_english=a.pd_english)
        print(f"wrote {len(paths)} config(s) under {root / 'configs'}")
    elif a.action == "match":  # the main suite's models, and the fair suite's when named
        models = suites.FAIR if a.suites == ["fair"] else None
        for kind, c in suites.check_matching(models=models).items():
            print(f"{kind:11s} total {c['total']:>11,} activated {c['activated']:>10,} "
                  f"sparse {c['sparse']:>11,} FLOPs/token {c['flops_per_token']:>11,}")
    elif a.action == "status":
        for name in names:
            st = runner.status(root, name)
            st["running"] = [_with_progress(root, name, n) for n in st["running"]]
            st["started"] = [_with_checkpoint(root, name, n) for n in st["started"]]
            print(f"{name}: " + "; ".join(f"{k} {len(v)} {v}" for k, v in st.items()))
    elif a.action == "ood":
        _ood(root, names, a)
    elif a.action == "report":
        for name in names:
            print(f"wrote {report.write_report(root, name)}")
    else:
        if a.jobs < 1:
            raise ValueError(f"--jobs: must be >= 1 (got {a.jobs})")
        # Several suites run as one queue (seed 0 of every suite's variants first).
        if a.background:
            log = runner.start_background(root, names, a.jobs, a.only)
            print(f"{'+'.join(names)}: running in the background; log {log}")
        elif runner.run_suite(root, names, a.jobs, a.only):
            return 1
    return 0
