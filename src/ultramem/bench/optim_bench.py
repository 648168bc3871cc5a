"""Benchmark the value-table update: dense grads + AdamW versus sparse grads + SparseAdam (lazy).

One training step of a value table alone (the rest of the model is the same on both paths):
pool the kept rows of T tokens (forward), backward, global-norm clip, optimiser step, zero_grad.
Dense: the gradient is a full (N*C, D) tensor and AdamW touches every row every step.
Sparse: the gradient holds only the T*K*C touched rows and SparseAdam updates only those.

Second mode (`--table-values 1e6,5e6,20e6`): the optimiser step alone against table size, for
the value-optimizer paths (ultramem.sparse_adam): dense fused AdamW on a dense gradient, torch
SparseAdam, SparseValueAdamW with full state, row state, and row state without the first moment,
on row-sparse gradients of a fixed number of touched rows. Prints median step ms and optimiser
state bytes (and their ratio to the table), the crossover, then one JSON line.

Run: python -m ultramem.bench.optim_bench [--num-keys 256 --value-dim 128 ...]
     ultramem bench optim --table-values 0.0625e6,0.25e6,1e6,5e6,20e6 --touched 8192 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from ultramem.optim import clip_grad_norm
from ultramem.sparse_adam import SparseValueAdamW
from ultramem.values import ValueTable


def _opt(table: ValueTable, sparse: bool, lr: float = 1e-3):
    if sparse:
        return torch.optim.SparseAdam([table.weight], lr=lr, betas=(0.9, 0.95))
    return torch.optim.AdamW([table.weight], lr=lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)


def bench_value_update(num_keys: int = 256, value_dim: int = 128, num_cores: int = 2, heads: int = 2,
                       topk: int = 16, expansion: int = 4, tokens: int = 2048, steps: int = 10,
                       warmup: int = 2, sparse: bool = False, seed: int = 0) -> dict:
    """Median seconds per full value step and per optimiser step (clip + step) for one path."""
    g = torch.Generator().manual_seed(seed)
    n_rows = num_keys * num_keys
    table = ValueTable(n_rows, value_dim, num_cores, sparse=sparse)
    torch.nn.init.normal_(table.weight, std=0.02, generator=g)
    opt = _opt(table, sparse)
    K = heads * topk
    step_s, opt_s = [], []
    for i in range(warmup + steps):
        row_TK = torch.randint(0, n_rows, (tokens, K), generator=g)
        bag_TK = torch.randint(0, expansion, (tokens, K), generator=g)
        w_TKC = torch.randn(tokens, K, num_cores, generator=g)
        t0 = time.perf_counter()
        out = table.pool(row_TK, bag_TK, w_TKC, expansion)
        out.square().mean().backward()
        t1 = time.perf_counter()
        clip_grad_norm([table.weight], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if i >= warmup:
            step_s.append(t2 - t0)
            opt_s.append(t2 - t1)
    step_s.sort()
    opt_s.sort()
    return {"path": "sparse" if sparse else "dense", "num_keys": num_keys, "value_dim": value_dim,
            "tokens": tokens, "table_params": table.weight.numel(),
            "touched_per_step": tokens * K * num_cores,
            "step_ms": 1e3 * step_s[len(step_s) // 2], "optim_ms": 1e3 * opt_s[len(opt_s) // 2]}


def run(sizes=((64, 64), (256, 128), (512, 256)), tokens=(256, 2048), steps: int = 10, **kw) -> list[dict]:
    return [bench_value_update(num_keys=n, value_dim=dv, tokens=t, steps=steps, sparse=sparse, **kw)
            for n, dv in sizes for t in tokens for sparse in (False, True)]


def format_table(rows: list[dict]) -> str:
    lines = [f"{'n':>5} {'D_v':>5} {'table params':>13} {'tokens':>7} {'touched rows':>13} {'path':>7} "
             f"{'step ms':>9} {'optim ms':>9}"]
    for r in rows:
        lines.append(f"{r['num_keys']:>5} {r['value_dim']:>5} {r['table_params']:>13,} {r['tokens']:>7} "
                     f"{r['touched_per_step']:>13,} {r['path']:>7} {r['step_ms']:>9.2f} "
                     f"{r['optim_ms']:>9.2f}")
    return "\n".join(lines)


SWEEP_PATHS = ("adamw", "sparse_adam", "sparse", "sparse_row", "sparse_row_no_m")


def _sweep_opt(path: str, w: torch.nn.Parameter, lr: float = 1e-3, wd: float = 0.1):
    if path == "adamw":
        return torch.optim.AdamW([w], lr=lr, betas=(0.9, 0.95), weight_decay=wd, fused=True)
    if path == "sparse_adam":  # cannot decay: runs without weight decay
        return torch.optim.SparseAdam([w], lr=lr, betas=(0.9, 0.95))
    row = "full" if path == "sparse" else "row"
    no_m = path == "sparse_row_no_m"
    return SparseValueAdamW([w], lr=lr, weight_decay=wd, row_state=row, first_moment=not no_m)


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


def bench_table_size(values: int, params_per_value: int = 16, row_dim: int = 128, touched: int = 8192,
                     steps: int = 7, warmup: int = 2, paths=SWEEP_PATHS, seed: int = 0) -> list[dict]:
    """Median ms and state bytes of each path on a table of `values` value slots of
    `params_per_value` parameters (the issue's unit: 20M values = 1.25M rows x 256 at E=16, i.e.
    320M parameters), stored as (rows, row_dim); each step touches `touched` distinct random rows.

    The paths share one table (so that the largest sizes fit in memory) and run one after another
    on the same gradients, each optimiser freed before the next is built."""
    g = torch.Generator().manual_seed(seed)
    rows = max(1, values * params_per_value // row_dim)
    touched = min(touched, rows)
    weight = torch.nn.Parameter(torch.randn(rows, row_dim, generator=g).mul_(0.02))
    grads = []
    for _ in range(warmup + steps):
        idx = torch.randperm(rows, generator=g)[:touched]  # unsorted, not flagged coalesced: as a table emits
        grads.append(torch.sparse_coo_tensor(idx[None], torch.randn(touched, row_dim, generator=g),
                                             (rows, row_dim), check_invariants=False))
    table_bytes = weight.numel() * weight.element_size()
    out = []
    for k in paths:
        opt = _sweep_opt(k, weight)
        step_s, path_s = [], []
        for i, grad in enumerate(grads):
            t0 = time.perf_counter()
            # the dense path pays for a full (rows, D) gradient (allocated + zeroed by the backward)
            weight.grad = grad.to_dense() if k == "adamw" else grad
            clip_grad_norm([weight], 1e9)  # reads the whole grad; coalesces a sparse one
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            weight.grad = None
            if i >= warmup:
                step_s.append(t2 - t1)
                path_s.append(t2 - t0)
        sb = _state_bytes(opt)
        del opt
        out.append({"path": k, "values": values, "params": weight.numel(), "rows": rows, "row_dim": row_dim,
                    "touched": touched, "step_ms": 1e3 * _median(step_s),
                    "grad_clip_step_ms": 1e3 * _median(path_s), "state_bytes": sb,
                    "state_ratio": sb / table_bytes})
    return out


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def crossover(rows: list[dict], path: str = "sparse", key: str = "grad_clip_step_ms") -> int | None:
    """Smallest table size from which `path` is faster than dense AdamW at every larger size."""
    sizes = sorted({r["params"] for r in rows})
    ms = {(r["params"], r["path"]): r[key] for r in rows}
    faster = [ms[(v, path)] < ms[(v, "adamw")] for v in sizes]
    for i, v in enumerate(sizes):
        if all(faster[i:]):
            return v
    return None


def format_sweep(rows: list[dict]) -> str:
    dense = {r["params"]: r for r in rows if r["path"] == "adamw"}
    lines = [f"{'values':>11} {'params':>12} {'rows':>10} {'touched':>7} {'path':>16} {'step ms':>9} "
             f"{'vs AdamW':>9} {'+grad+clip':>10} {'vs AdamW':>9} {'state MB':>9} {'state/table':>11}"]
    for r in rows:
        d = dense[r["params"]]
        lines.append(f"{r['values']:>11,} {r['params']:>12,} {r['rows']:>10,} {r['touched']:>7,} "
                     f"{r['path']:>16} "
                     f"{r['step_ms']:>9.2f} {d['step_ms'] / r['step_ms']:>8.1f}x "
                     f"{r['grad_clip_step_ms']:>10.2f} "
                     f"{d['grad_clip_step_ms'] / r['grad_clip_step_ms']:>8.1f}x "
                     f"{r['state_bytes'] / 2**20:>9.1f} {r['state_ratio']:>11.3f}")
    return "\n".join(lines)


def sweep_main(a) -> None:
    sizes = [int(float(v)) for v in a.table_values.split(",")]
    rows = []
    for v in sizes:
        rows += bench_table_size(v, a.params_per_value, a.row_dim, a.touched, a.steps)
        print(format_sweep([r for r in rows if r["values"] == v]), file=sys.stderr, flush=True)  # progress
    print(f"torch threads: {torch.get_num_threads()}; weight decay 0.1 (SparseAdam: none); {a.touched:,} "
          f"touched rows of {a.row_dim}; 'step ms' = optimizer.step() alone, '+grad+clip' adds the dense "
          "gradient's materialisation (dense path) and clip_grad_norm (coalesces a sparse grad)")
    print(format_sweep(rows))
    cross = {key: crossover(rows, key=key) for key in ("step_ms", "grad_clip_step_ms")}
    print(f"crossover, SparseValueAdamW (full state) faster than dense AdamW from this many table params: "
          f"step only {cross['step_ms']}, grad + clip + step {cross['grad_clip_step_ms']}")
    at_big = {r["path"]: r for r in rows if r["params"] == max(r["params"] for r in rows)}
    d = at_big["adamw"]
    summary = {"bench": "optim_sweep", "threads": torch.get_num_threads(), "touched": a.touched,
               "row_dim": a.row_dim, "crossover_params": cross, "largest_values": d["values"],
               "largest_params": d["params"],
               "step_speedup_at_largest": {k: d["step_ms"] / r["step_ms"] for k, r in at_big.items()},
               "grad_clip_step_speedup_at_largest": {k: d["grad_clip_step_ms"] / r["grad_clip_step_ms"]
                                                     for k, r in at_big.items()},
               "state_ratio_at_largest": {k: r["state_ratio"] for k, r in at_big.items()}, "rows": rows}
    print(json.dumps(summary))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64x64,256x128,512x256", help="comma list of num_keys x value_dim")
    ap.add_argument("--tokens", default="256,2048", help="comma list of tokens per step (batch * seq)")
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--table-values", default=None,
                    help="comma list of table sizes in value slots (e.g. 1e6,20e6): run the optimiser sweep")
    ap.add_argument("--params-per-value", type=int, default=16,
                    help="sweep: parameters per value slot (D_v / E; the issue's 256 / 16)")
    ap.add_argument("--row-dim", type=int, default=128, help="sweep: stored row width")
    ap.add_argument("--touched", type=int, default=8192, help="sweep: distinct rows touched per step")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.table_values:
        sweep_main(a)
        return
    sizes = [tuple(int(v) for v in s.split("x")) for s in a.sizes.split(",")]
    tokens = [int(t) for t in a.tokens.split(",")]
    print(f"torch threads: {torch.get_num_threads()}, heads {a.heads} x top-{a.topk}, 2 cores (MCS), E=4")
    print(format_table(run(sizes, tokens=tokens, steps=a.steps, heads=a.heads, topk=a.topk)))


if __name__ == "__main__":
    main()
