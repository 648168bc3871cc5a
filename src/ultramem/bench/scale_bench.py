"""Decode time of one UltraMemLayer at the seed's scale against the bytes a step must read.

Run: ultramem bench scale [--sizes 1,5,20] [--batches 1,8,64] [--expansion 16] [--threads 1]
     [--budget 6] [--json-out PATH]

Layer: D=1024, D_v=256, D_k=128, H=2, m=32, r=2, h=2 (the seed's sizes), eval mode, inference
mode, T=1, fp32, on CPU. "20M values" are the E*n^2 virtual slots: n = round(sqrt(20M / E)), so
E=16 gives n=1,118 (n' = 4,472 keys scored per side, 1.25M physical rows, a 1.3 GB table) and
E=4 gives n=2,236 (the same n', a 5 GB table).

Per (size, B), interleaved over the batches of a size (bench/common.py):
    bytes_read = every parameter outside the value table once (keys, W_q, W_o, cores, norms)
                 + the distinct physical value rows this input reads * D_v * 4
    bound_ms   = bytes_read / copy bandwidth, the copy bandwidth ((read + written) bytes/s of a
                 64 MB torch copy) measured in the same run, just before the size's timings
    ratio      = median decode time / bound_ms (the issue's target: <= 1.3 at B=1, 20M)
and the B=8 / B=1 time ratio (target <= 2). Wall time and the thread's CPU time are both
printed: on a shared machine the CPU time is the steadier of the two, and the copy bandwidth
itself moves with the neighbours' load (12-30 GB/s seen here), so the ratios do too.
--compare also times the no-grad path that builds the full (S, N, J) score matrix
(`retrieval.search_only = False`, the path before the folded-key search) interleaved with the
default one (chosen by shape, see `TuckerRetrieval._search_only`). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import platform

import torch

from ultramem import UltraMemConfig, UltraMemLayer
from ultramem.bench.common import Clock, quantile, spread, time_interleaved

SEED_SHAPE = {"dim": 1024, "value_dim": 256, "key_dim": 128, "heads": 2, "topk": 32, "tucker_rank": 2,
              "num_cores": 2}
TARGET_B1_RATIO = 1.3
TARGET_B8_OVER_B1 = 2.0


def build_layer(millions: float, expansion: int, seed: int = 0) -> UltraMemLayer:
    n = round(math.sqrt(millions * 1e6 / expansion))
    torch.manual_seed(seed)
    cfg = UltraMemConfig(num_keys=n, value_expansion=expansion, **SEED_SHAPE)
    return UltraMemLayer(cfg).eval()


def copy_gbps(megabytes: int = 64, reps: int = 7) -> float:
    """(read + written) bytes/s of the best of `reps` copies of a `megabytes` buffer."""
    src = torch.randn(megabytes * 2 ** 20 // 4)
    dst = torch.empty_like(src)
    clock = Clock(torch.device("cpu"))
    best = min(clock(lambda: dst.copy_(src)) for _ in range(reps))
    return 2 * src.numel() * 4 / best / 1e9


@torch.inference_mode()
def bytes_read(layer: UltraMemLayer, x_BTD: torch.Tensor) -> dict:
    """Dense bytes (every parameter outside the value table) and the value-row bytes of x's step."""
    table = {id(p) for p in layer.values.parameters()}
    dense = sum(p.numel() * p.element_size() for p in layer.parameters() if id(p) not in table)
    idx_BTHM = layer.retrieve(x_BTD).indices
    rows = int(torch.unique(layer.physical_rows(idx_BTHM)).numel())
    row_bytes = layer.cfg.v_dim * layer.values.weight.element_size()
    return {"dense_bytes": dense, "value_rows": rows, "value_bytes": rows * row_bytes,
            "bytes": dense + rows * row_bytes}


def time_size(layer: UltraMemLayer, batches: list[int], reps: int, budget_s: float,
              paths: tuple[str, ...]) -> dict[tuple[str, int], dict]:
    """Median decode-step time per (search path, batch size), all interleaved; fresh inputs each
    repeat. paths: "default" (the no-grad path chosen by shape) and/or "full" (the full score
    matrix, `retrieval.search_only = False`)."""
    gen = torch.Generator().manual_seed(1)
    D = layer.cfg.dim
    xs = {B: [torch.randn(B, 1, D, generator=gen) for _ in range(reps)] for B in batches}

    def step(path: str, B: int, i: int):
        layer.retrieval.search_only = None if path == "default" else False
        return layer(xs[B][i])

    fns = {(path, B): (lambda i, p=path, B=B: step(p, B, i)) for path in paths for B in batches}
    clock = Clock(torch.device("cpu"))
    cpu: dict = {}
    try:
        with torch.inference_mode():
            times = time_interleaved(fns, list(range(reps)), clock, warmup=2, min_reps=3, max_reps=reps,
                                     budget_s=budget_s, cpu_out=cpu)
    finally:
        layer.retrieval.search_only = None
    return {key: {**spread(ts), "cpu_median_ms": quantile(cpu[key], 0.5) * 1e3} for key, ts in times.items()}


def run_size(millions: float, expansion: int, batches: list[int], budget_s: float,
             paths: tuple[str, ...]) -> list[dict]:
    layer = build_layer(millions, expansion)
    reps = 12 if millions < 10 else 6
    gbps = copy_gbps()
    timed = time_size(layer, batches, reps, budget_s, paths)
    rows = []
    gen = torch.Generator().manual_seed(2)
    for B in batches:
        acct = bytes_read(layer, torch.randn(B, 1, layer.cfg.dim, generator=gen))
        bound_ms = acct["bytes"] / (gbps * 1e9) * 1e3
        for path in paths:
            t = timed[(path, B)]
            rows.append({"values_M": millions, "n": layer.cfg.num_keys, "E": expansion, "path": path,
                         "keys_per_side": layer.cfg.keys_per_side, "B": B, **t, **acct, "copy_GBps": gbps,
                         "bound_ms": bound_ms, "ratio_to_bound": t["median_ms"] / bound_ms,
                         "cpu_ratio_to_bound": t["cpu_median_ms"] / bound_ms})
    del layer
    return rows


def summarise(rows: list[dict]) -> dict:
    big = max(r["values_M"] for r in rows)
    at = {r["B"]: r for r in rows if r["values_M"] == big and r["path"] == "default"}
    out = {"largest_values_M": big}
    if 1 in at:
        out["b1_ratio_to_bound"] = at[1]["ratio_to_bound"]
        out["b1_cpu_ratio_to_bound"] = at[1]["cpu_ratio_to_bound"]
        out["b1_target_met"] = at[1]["ratio_to_bound"] <= TARGET_B1_RATIO
    if 1 in at and 8 in at:
        out["b8_over_b1"] = at[8]["median_ms"] / at[1]["median_ms"]
        out["b8_over_b1_cpu"] = at[8]["cpu_median_ms"] / at[1]["cpu_median_ms"]
        out["b8_target_met"] = out["b8_over_b1"] <= TARGET_B8_OVER_B1
    full = {(r["values_M"], r["B"]): r for r in rows if r["path"] == "full"}
    if full:
        out["speedup_vs_full_cpu"] = {
            f"{r['values_M']:g}M_B{r['B']}": round(full[(r["values_M"], r["B"])]["cpu_median_ms"]
                                                  / r["cpu_median_ms"], 3)
            for r in rows if r["path"] == "default" and (r["values_M"], r["B"]) in full}
    return out


def print_row(r: dict) -> None:
    print(f"{r['values_M']:>6g}M {r['n']:>5} {r['path']:>11} {r['B']:>3} {r['median_ms']:>9.2f} "
          f"{r['p25_ms']:>6.2f}-{r['p75_ms']:<6.2f} {r['cpu_median_ms']:>7.2f} {r['bytes'] / 1e6:>8.1f} "
          f"{r['copy_GBps']:>9.1f} {r['bound_ms']:>8.2f} {r['ratio_to_bound']:>6.2f} "
          f"{r['cpu_ratio_to_bound']:>6.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ultramem bench scale", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1,5,20", help="millions of values (E*n^2), comma-separated")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--expansion", type=int, default=16, help="E (a perfect square)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget", type=float, default=6.0, help="seconds of timed repeats per size")
    p.add_argument("--compare", action="store_true",
                   help="also time the full-score-matrix search (retrieval.search_only=False), interleaved")
    p.add_argument("--json-out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    sizes = [float(s) for s in a.sizes.split(",")]
    batches = [int(b) for b in a.batches.split(",")]
    paths = ("full", "default") if a.compare else ("default",)
    rows = []
    print(f"{'values':>7} {'n':>5} {'path':>11} {'B':>3} {'median ms':>9} {'p25-p75':>13} {'cpu ms':>7} "
          f"{'MB read':>8} {'copy GB/s':>9} {'bound ms':>8} {'ratio':>6} {'cpu r.':>6}")
    for millions in sizes:
        for r in run_size(millions, a.expansion, batches, a.budget, paths):
            rows.append(r)
            print_row(r)
    summary = summarise(rows)
    print(f"targets: B=1 at the largest size within {TARGET_B1_RATIO}x of the bound, B=8 within "
          f"{TARGET_B8_OVER_B1}x of B=1 -> {summary}")
    result = {"bench": "scale", "threads": a.threads, "machine": platform.machine(),
              "torch": torch.__version__, "rows": rows, "summary": summary}
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
