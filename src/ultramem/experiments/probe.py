"""Evaluate a trained UltraMem run under other top-m searches: `ultramem exp probe RUN`.

Answers "does the approximate search cost the trained model anything?": the same checkpoint is
evaluated (val loss, recall against exact, value rows read) with the search it was trained with
and with each alternative (wider stage 1, both proxy signs, brute-force exact).
"""

from __future__ import annotations

import json
import sys
import time

import torch

SEARCHES = ("rank1", "rank1_both_signs", "exact")


def probe_run(run: str, searches=SEARCHES, stage1: list[int] | None = None,
              windows: int | None = None, threads: int = 1, log=print) -> list[dict]:
    """One row per (search, stage1_topk) setting of every UltraMem layer of the run's model."""
    from ..data import DataConfig, prepare_data
    from ..diagnostics import search_override
    from ..train import TrainConfig, autocast_for, evaluate, load_run

    torch.set_num_threads(threads)
    model, run_cfg, _, ckpt = load_run(run)
    if not run_cfg.get("data") or not run_cfg.get("train"):
        raise ValueError(f"{ckpt.path}: checkpoint has no run config; cannot rebuild its data")
    tr = {**run_cfg["train"], "memory_diagnostics": True}
    if windows is not None:
        tr["eval_windows"] = windows
    tc = TrainConfig(**tr)
    data = prepare_data(DataConfig.from_dict(run_cfg["data"]), tc.cache_dir, log=log)
    amp = autocast_for(tc.dtype, torch.device("cpu"))
    settings = [(s, None) for s in searches]
    settings += [(s, m1) for s in searches if s != "exact" for m1 in stage1 or []]
    rows = []
    for search, m1 in settings:
        changes = {"topm_search": search, **({"stage1_topk": m1} if m1 is not None else {})}
        with search_override(model, **changes) as layers:
            t0 = time.perf_counter()
            res = evaluate(model, data, tc, amp)
            row = {"search": search, "stage1_topk": layers[0].cfg.m1, **res,
                   "eval_seconds": time.perf_counter() - t0}
        rows.append(row)
        log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return rows


def main(a) -> int:
    rows = probe_run(a.run, a.search or SEARCHES, a.stage1, a.windows,
                     log=lambda m: print(m, file=sys.stderr))
    keys = [k for k in rows[0] if k.endswith("recall") or k.endswith("rows_used")]
    print("| search | m1 | val loss | " + " | ".join(keys) + " | eval s |")
    print("|---|---|---|" + "---|" * len(keys) + "---|")
    for r in rows:
        print(f"| {r['search']} | {r['stage1_topk']} | {r['val_loss']:.4f} | "
              + " | ".join(f"{r[k]:.3f}" for k in keys) + f" | {r['eval_seconds']:.1f} |")
    print(json.dumps({"run": a.run, "rows": rows}))
    return 0
