"""Worker of `ultramem bench serve` for the big-table case: one process that decodes with an
UltraMem layer whose table is served from a file, and reports its latency and peak RSS.

Run by serve_bench.py as `python -m ultramem.bench.serve_big --file F --mode disk|both ...`:
- mode "disk": the table stays on disk (memory-mapped); this process's peak RSS (ru_maxrss) is
  the number the issue's < 1 GB target is about;
- mode "both": the same layer with the table read into RAM and with it on disk, timed
  interleaved in one process (the in-memory vs offloaded latency ratio; RSS here is large).
Rows are read once before timing (the "cold" pass) so timed steps find them in the page cache.
Prints one JSON line. Shape legend: B batch (one new token each), D model width.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from ..config import UltraMemConfig
from ..layers import UltraMemLayer
from ..offload import OffloadedValueTable
from . import common


def rss_mb() -> dict:
    """RSS now and its peak (VmHWM) in MB. Not getrusage's ru_maxrss: in a process started by
    fork + exec it keeps the parent's RSS at the fork, not this program's own peak."""
    with open("/proc/self/status") as f:
        kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")}
    return {"rss_now_MB": kb["VmRSS"] / 1024, "rss_peak_MB": kb["VmHWM"] / 1024}


def build(a) -> tuple[UltraMemLayer, dict]:
    cfg = UltraMemConfig(dim=a.dim, num_keys=a.num_keys, key_dim=a.key_dim, value_dim=a.value_dim,
                         heads=a.heads, topk=a.topk, value_expansion=a.expansion)
    torch.manual_seed(0)
    layer = UltraMemLayer(cfg, table_factory=OffloadedValueTable.factory(
        a.file, map_budget_mb=a.map_budget_mb)).eval()
    tables = {"offloaded": layer.values}
    if a.mode == "both":
        tables["in_memory"] = OffloadedValueTable(a.file, cfg.num_values, cfg.v_dim, cfg.num_cores,
                                                  where="host")
    return layer, tables


def run(a) -> dict:
    torch.set_num_threads(1)
    layer, tables = build(a)
    out = {"mode": a.mode, "num_values": layer.cfg.num_values, "value_dim": layer.cfg.v_dim,
           "perm_MB": layer.perm.numel() * layer.perm.element_size() / 2 ** 20, "after_build": rss_mb(),
           "batches": {}}
    gen = torch.Generator().manual_seed(1)
    clock = common.Clock(torch.device("cpu"))

    def step(name):
        def fn(x):
            layer._modules["values"] = tables[name]
            return layer(x)
        return fn

    with torch.inference_mode():
        for B in a.batches:
            inputs = [torch.randn(B, 1, a.dim, generator=gen) for _ in range(a.inputs)]
            t0 = time.perf_counter()
            for x in inputs:  # cold: the rows come from disk (or the page cache of an earlier run)
                step("offloaded")(x)
            cold_s = (time.perf_counter() - t0) / len(inputs)
            fns = {n: step(n) for n in tables}
            cpu = {}
            times = common.time_interleaved(fns, inputs, clock, warmup=1, min_reps=a.inputs,
                                            max_reps=200, budget_s=a.budget_s, cpu_out=cpu)
            out["batches"][B] = {"cold_ms": cold_s * 1e3, **rss_mb(),
                                 **{n: common.spread(ts)["median_ms"] for n, ts in times.items()},
                                 **{f"{n}_cpu": common.spread(ts)["median_ms"] for n, ts in cpu.items()}}
    out["end"] = rss_mb()
    return out


def main_worker(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ultramem.bench.serve_big")
    p.add_argument("--file", required=True)
    p.add_argument("--mode", choices=("disk", "both"), default="disk")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 64, 256])
    p.add_argument("--inputs", type=int, default=4)
    p.add_argument("--budget-s", type=float, default=3.0)
    p.add_argument("--map-budget-mb", type=float, default=256)
    for name, default in (("dim", 512), ("num-keys", 4472), ("key-dim", 64), ("value-dim", 64),
                          ("heads", 2), ("topk", 32), ("expansion", 4)):
        p.add_argument(f"--{name}", type=int, default=default)
    a = p.parse_args(argv)
    print(json.dumps(run(a)))


if __name__ == "__main__":
    main_worker(sys.argv[1:])
