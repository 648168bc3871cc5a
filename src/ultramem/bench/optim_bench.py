"""Benchmark the value-table update: dense grads + AdamW versus sparse grads + SparseAdam (lazy).

One training step of a value table alone (the rest of the model is the same on both paths):
pool the kept rows of T tokens (forward), backward, global-norm clip, optimiser step, zero_grad.
Dense: the gradient is a full (N*C, D) tensor and AdamW touches every row every step.
Sparse: the gradient holds only the T*K*C touched rows and SparseAdam updates only those.

Run: python -m ultramem.bench.optim_bench [--num-keys 256 --value-dim 128 ...]
"""

from __future__ import annotations

import argparse
import time

import torch

from ultramem.optim import clip_grad_norm
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64x64,256x128,512x256", help="comma list of num_keys x value_dim")
    ap.add_argument("--tokens", default="256,2048", help="comma list of tokens per step (batch * seq)")
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    sizes = [tuple(int(v) for v in s.split("x")) for s in a.sizes.split(",")]
    tokens = [int(t) for t in a.tokens.split(",")]
    print(f"torch threads: {torch.get_num_threads()}, heads {a.heads} x top-{a.topk}, 2 cores (MCS), E=4")
    print(format_table(run(sizes, tokens=tokens, steps=a.steps, heads=a.heads, topk=a.topk)))


if __name__ == "__main__":
    main()
