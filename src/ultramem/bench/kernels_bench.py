"""GPU numbers of the kernels: fused lookup bandwidth, the search stages, training tokens/s.

Run: ultramem bench kernels [--device cuda] [--dtype bf16] [--quick] [--out docs/gpu] [--peak-gbps X]

Parts (each group's candidates interleaved, bench/common.py; CUDA events on a GPU):
- lookup: `ops.pool` forward, and forward + backward, at the seed's 20M values (E=16: 1.25M
  physical rows of D_v=256 in h=2 chunks; K = H*m = 64 entries a token in 16 IVE bags) for
  T = 1 .. 16384 tokens: Triton beside embedding_bag (torch's fast path) and the reference.
      bytes = distinct rows read * D_v * element size + T*K*(row, bag, weight bytes) + output
      GB/s  = bytes / median time, beside the device's copy bandwidth measured in the same run and
              the nominal peak (--peak-gbps; target: forward >= 50% of it).
- search: `ops.stage1_topk` (Triton: scoring + top-m1 without the score matrix; torch: the full
  score matrix + top-k) and `ops.grid_topm` at n' = 4,472, m1 = m = 32, for N = 1 .. 4096 tokens.
- train: tokens/s of one optimiser step (forward, backward, AdamW, after_optimizer_step) of the
  decode benchmark's matched dense / MoE / UltraMem models (D=512, 4 layers, sparse ratio 16),
  bf16 autocast on a GPU; target: UltraMem >= 0.7x dense.
Without a GPU (or triton) the Triton rows are skipped; --quick shrinks every shape (a smoke run).
Writes kernels.json and kernels.md (and kernels.png with matplotlib) under --out; the last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from ..model import LanguageModel
from ..ops.pooling import pool_fused, pool_reference
from ..ops.search import grid_topm_reference, stage1_topk_reference
from ..ops.triton_registry import triton_available
from .common import (
    Clock,
    copy_bandwidth,
    line_plots,
    markdown_table,
    pick_device,
    pick_dtype,
    spread,
    time_interleaved,
)

TARGET_LOOKUP_FRACTION = 0.5
TARGET_TRAIN_VS_DENSE = 0.7


def _triton_ok(dev: torch.device) -> bool:
    return dev.type == "cuda" and triton_available()


def _fwd_bwd(f, table, G):
    def run(x):
        table.grad = None  # a fresh gradient each call, as in a training step
        f(table, x[0], x[1], x[2], G).float().sum().backward()
    return run


def _time(fns: dict, inputs: list, clock: Clock, budget: float) -> dict:
    times = time_interleaved(fns, inputs, clock, warmup=2, min_reps=5, max_reps=50, budget_s=budget)
    return {n: spread(ts) for n, ts in times.items()}


def lookup_part(dev, dtype, quick: bool, clock: Clock, budget: float) -> list[dict]:
    rows_n, C, D, K, G = (5_000, 2, 32, 16, 4) if quick else (1_250_000, 2, 128, 64, 16)
    table = (torch.randn(rows_n * C, D, device=dev) * 0.02).to(dtype).requires_grad_()
    fns = {"embedding_bag": pool_fused, "reference": pool_reference}
    if _triton_ok(dev):
        from ..ops.triton_pool import pool_triton
        fns = {"triton": pool_triton, **fns}
    out = []
    for T in ((1, 64, 512) if quick else (1, 64, 1024, 4096, 16384)):
        gen = torch.Generator().manual_seed(T)
        xs = [(torch.randint(0, rows_n, (T, K), generator=gen).to(dev),
               torch.randint(0, G, (T, K), generator=gen).to(dev),
               torch.randn(T, K, C, generator=gen).to(dev).requires_grad_()) for _ in range(4)]
        distinct = int(torch.unique(xs[0][0]).numel())
        nbytes = (distinct * C * D * table.element_size() + T * K * (8 + 8 + C * 4)
                  + T * G * C * D * table.element_size())
        names = [n for n in fns if n != "reference" or T <= 1024]
        with torch.no_grad():
            fwd = _time({n: (lambda x, f=fns[n]: f(table, x[0], x[1], x[2], G)) for n in names}, xs, clock,
                        budget)
        both = _time({n: _fwd_bwd(fns[n], table, G) for n in names}, xs, clock, budget)
        for n in names:
            out.append({"impl": n, "T": T, "bytes": nbytes, "fwd_ms": fwd[n]["median_ms"],
                        "fwd_GBps": nbytes / fwd[n]["median_ms"] / 1e6, "fwd_bwd_ms": both[n]["median_ms"]})
    return out


def search_part(dev, dtype, quick: bool, clock: Clock, budget: float) -> list[dict]:
    H, R, P, Dk, m1 = (2, 2, 256, 32, 8) if quick else (2, 2, 4472, 128, 32)
    keys = torch.randn(2, Dk, H * R * P, device=dev, dtype=dtype)
    ut = torch.randn(2, H, R, device=dev)
    core = torch.rand(H, R, R, device=dev)
    s1 = {"torch": lambda q: stage1_topk_reference(q, keys, ut, m1)}
    grid = {"torch": lambda s: grid_topm_reference(s[0], s[1], core, m1)}
    if _triton_ok(dev):
        from ..ops.triton_topk import grid_topm_triton, stage1_topk_triton
        s1["triton"] = lambda q: stage1_topk_triton(q, keys, ut, m1)
        grid["triton"] = lambda s: grid_topm_triton(s[0], s[1], core, m1)
    out = []
    for N in ((1, 16) if quick else (1, 64, 1024, 4096)):
        qs = [torch.randn(N, 2, Dk, device=dev, dtype=dtype) for _ in range(4)]
        scs = [torch.randn(2, N, H, R, m1, device=dev, dtype=dtype) for _ in range(4)]
        with torch.no_grad():
            a, b = _time(s1, qs, clock, budget), _time(grid, scs, clock, budget)
        out += [{"op": "stage1_topk", "impl": n, "N": N, "ms": v["median_ms"]} for n, v in a.items()]
        out += [{"op": "grid_topm", "impl": n, "N": N, "ms": v["median_ms"]} for n, v in b.items()]
    return out


def train_part(dev, dtype, quick: bool, clock: Clock, budget: float) -> dict:
    from ..optim import build_optimizer
    from .decode import Shapes, _lm_config, quick_shapes

    sh = quick_shapes() if quick else Shapes(ctx=512)
    B, T = (4, 32) if quick else (32, 512)
    steps = {}
    for kind in ("dense", "moe", "ultramem"):
        torch.manual_seed(0)
        model = LanguageModel(_lm_config(kind, sh, 16)).to(dev).train()
        opt = build_optimizer(model, lr=1e-3, total_steps=1000)

        def step(batch, model=model, opt=opt):
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                _, loss = model(*batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.after_optimizer_step()

        steps[kind] = step
    gen = torch.Generator().manual_seed(0)
    vocab = sh.vocab
    xs = [tuple(torch.randint(0, vocab, (B, T), generator=gen).to(dev) for _ in range(2)) for _ in range(4)]
    res = _time(steps, xs, clock, budget)
    tps = {k: B * T / (v["median_ms"] / 1e3) for k, v in res.items()}
    return {"batch": B, "seq": T, "tokens_per_s": tps, "ultramem_vs_dense": tps["ultramem"] / tps["dense"],
            "moe_vs_dense": tps["moe"] / tps["dense"]}


def report(result: dict, out: Path) -> str:
    peak = result["peak_GBps"]
    lines = [f"# Kernel numbers on {result['device']} ({result['dtype']})", "",
             f"copy bandwidth measured: {result['copy']['copy_GBps']:.0f} GB/s; "
             f"nominal peak: {peak or '-'} GB/s{' (--quick: small shapes)' if result['quick'] else ''}", "",
             "## Fused lookup (pool), 20M values, E=16, K=64", "",
             markdown_table(["impl", "T", "MB", "fwd ms", "fwd GB/s", "of peak", "fwd+bwd ms"],
                            [[r["impl"], r["T"], f"{r['bytes'] / 1e6:.1f}", f"{r['fwd_ms']:.3f}",
                              f"{r['fwd_GBps']:.0f}", "-" if not peak else f"{r['fwd_GBps'] / peak:.0%}",
                              f"{r['fwd_bwd_ms']:.3f}"] for r in result["lookup"]]), "",
             "## Search stages, n' = 4472, m1 = m = 32", "",
             markdown_table(["op", "impl", "N", "ms"], [[r["op"], r["impl"], r["N"], f"{r['ms']:.3f}"]
                                                        for r in result["search"]])]
    if result.get("train"):
        tr = result["train"]
        lines += ["", f"## Training, B={tr['batch']} T={tr['seq']}", "",
                  markdown_table(["model", "tokens/s"],
                                 [[k, f"{v:,.0f}"] for k, v in tr["tokens_per_s"].items()]),
                  "", f"UltraMem / dense: {tr['ultramem_vs_dense']:.2f}x (target {TARGET_TRAIN_VS_DENSE}x)"]
    text = "\n".join(lines) + "\n"
    (out / "kernels.md").write_text(text)
    series = {}
    for r in result["lookup"]:
        series.setdefault(r["impl"], ([], []))
        series[r["impl"]][0].append(r["T"])
        series[r["impl"]][1].append(r["fwd_GBps"])
    hl = {"copy": result["copy"]["copy_GBps"], **({"peak": peak} if peak else {})}
    line_plots(out / "kernels.png", [{"title": "pool forward", "xlabel": "tokens", "ylabel": "GB/s",
                                      "series": series, "logx": True, "hlines": hl}])
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ultramem bench kernels", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--parts", default="lookup,search,train")
    p.add_argument("--budget", type=float, default=3.0, help="seconds of timed repeats per group")
    p.add_argument("--peak-gbps", type=float, default=None, help="the device's nominal memory bandwidth")
    p.add_argument("--out", default="bench_out/kernels")
    a = p.parse_args(argv)
    dev = pick_device(a.device)
    dtype = pick_dtype(dev, a.dtype)
    clock, parts = Clock(dev), a.parts.split(",")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    result = {"bench": "kernels", "device": name, "dtype": str(dtype).removeprefix("torch."),
              "copy": copy_bandwidth(dev, 64 if a.quick else 1024), "peak_GBps": a.peak_gbps,
              "triton": _triton_ok(dev), "quick": a.quick, "lookup": [], "search": [], "train": None}
    if "lookup" in parts:
        result["lookup"] = lookup_part(dev, dtype, a.quick, clock, a.budget)
    if "search" in parts:
        result["search"] = search_part(dev, dtype, a.quick, clock, a.budget)
    if "train" in parts:
        result["train"] = train_part(dev, dtype, a.quick, clock, a.budget * 3)
    (out / "kernels.json").write_text(json.dumps(result, indent=1))
    print(report(result, out))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
