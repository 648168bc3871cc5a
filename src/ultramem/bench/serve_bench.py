"""Serving benchmark: decode latency and value bytes read of quantised and offloaded value tables,
the peak RSS of a table served from disk, and the quality cost of quantising a trained model.

Run: ultramem bench serve [--quick] [--checkpoint RUN] [--skip-big] [--out DIR]

Three parts, CPU, one thread (timing on a shared machine is noisy: candidates are interleaved and
ratios come from one run, see common.py):
1. benchmark size: one UltraMem layer at the decode benchmark's shape (D=512, values of width
   256, 2 heads x top-32, E=4, 2 cores; 600^2 = 360k values, 92M value params ~ the x32 MoE of
   `bench decode`), decoding (B, 1, D) for B = 1 .. 256 with its table as fp32 / bf16 / int8 /
   int4 / fp8 / offloaded (memory-mapped file; and "offloaded_staged", the CUDA path's host
   gather run on CPU). Per candidate: layer step time, table lookup (pool) time, and value
   bytes read per step (distinct physical rows read x bytes per row, scales included);
2. big table: 4472^2 ~ 20M values of width 64 (5.1 GB fp32), the file generated block by block
   (never in RAM), served from disk by a subprocess (serve_big.py) whose peak RSS is reported
   (VmHWM; a child's ru_maxrss keeps the parent's RSS at fork across exec), and, when the machine
   has the memory, a second one that times in-memory vs offloaded interleaved once the rows read
   are in the page cache;
3. quality (--checkpoint RUN, a trained run): val loss and fact recall of the run with its tables
   as fp32 / bf16 / int8 / int4 / fp8.
Prints tables, writes DIR/serve.json and DIR/serve.md, and ends with one JSON line.

Shape legend: B batch (sequences, one new token each), D model width.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..config import UltraMemConfig
from ..layers import UltraMemLayer
from ..memory import memory_layers
from ..offload import OffloadedValueTable, read_table_header, save_table, write_table_file
from ..quantized import KINDS, QuantizedValueTable, quantize_values
from ..values import ValueTable
from . import common

LAYER = dict(dim=512, num_keys=600, key_dim=64, value_dim=256, heads=2, topk=32, value_expansion=4)
BIG = dict(num_keys=4472, value_dim=64)  # 4472^2 = 19,998,784 values
TARGETS = {"int8_val_loss_delta_max": 0.01, "int8_bytes_ratio_max": 0.25, "int8_latency_ratio_max_B1_64": 1.0,
           "big_peak_rss_MB_max": 1024, "big_B1_latency_ratio_max": 2.0}


def bytes_per_row(table) -> int:
    if hasattr(table, "bytes_per_row"):
        return table.bytes_per_row()
    return table.dim * table.weight.element_size()


def make_tables(layer: UltraMemLayer, tmp: Path) -> dict:
    base = layer.values
    bf16 = ValueTable(base.num_rows, base.dim, base.num_chunks)
    bf16.weight = torch.nn.Parameter(base.weight.detach().bfloat16(), requires_grad=False)
    tables = {"fp32": base, "bf16": bf16}
    tables.update({k: QuantizedValueTable.from_table(base, k) for k in KINDS})
    path = save_table(base, tmp / "bench.values.safetensors")
    for name, staged in (("offloaded", False), ("offloaded_staged", True)):
        tables[name] = OffloadedValueTable(path, base.num_rows, base.dim, base.num_chunks, staged=staged,
                                           map_budget_mb=None)  # 368 MB: the whole file may stay mapped
    return {n: t.eval() for n, t in tables.items()}


def time_batch(layer, tables, B: int, a, gen, clock) -> list[dict]:
    """Layer step and lookup time, bytes read, of every table at batch B (interleaved)."""
    E = layer.cfg.value_expansion
    xs = [torch.randn(B, 1, layer.cfg.dim, generator=gen) for _ in range(a.inputs)]
    lookups, rows = [], []
    for x in xs:
        idx, scores = layer.retrieval(x)
        row, bag = layer.slot_locations(idx.reshape(B, -1))
        lookups.append((row, bag, scores.reshape(B, -1, layer.cfg.num_cores)))
        rows.append(torch.unique(row).numel())

    def step(name):
        def fn(x):
            layer._modules["values"] = tables[name]
            return layer(x)
        return fn

    for name in tables:  # untimed pass: every row read is in the page cache before timing
        for x in xs:
            step(name)(x)
    cpu_s, cpu_p = {}, {}
    steps = common.time_interleaved({n: step(n) for n in tables}, xs, clock, warmup=1, min_reps=a.inputs,
                                    max_reps=300, budget_s=a.budget_s, cpu_out=cpu_s)
    pools = common.time_interleaved({n: (lambda lk, t=t: t.pool(*lk, E)) for n, t in tables.items()},
                                    lookups, clock, warmup=1, min_reps=a.inputs, max_reps=300,
                                    budget_s=a.budget_s / 2, cpu_out=cpu_p)
    layer._modules["values"] = tables["fp32"]
    distinct = sum(rows) / len(rows)
    med = lambda ts: common.spread(ts)["median_ms"]  # noqa: E731
    return [{"B": B, "table": n, "step_ms": med(steps[n]), "step_cpu_ms": med(cpu_s[n]),
             "pool_ms": med(pools[n]), "pool_cpu_ms": med(cpu_p[n]), "rows_read": distinct,
             "value_bytes": distinct * bytes_per_row(t)} for n, t in tables.items()]


def layer_part(a) -> list[dict]:
    torch.manual_seed(0)
    layer = UltraMemLayer(UltraMemConfig(**LAYER)).eval()
    gen, clock = torch.Generator().manual_seed(0), common.Clock(torch.device("cpu"))
    out = []
    with tempfile.TemporaryDirectory(dir=a.out) as tmp, torch.inference_mode():
        tables = make_tables(layer, Path(tmp))
        for B in a.batches:
            res = time_batch(layer, tables, B, a, gen, clock)
            ref = next(r for r in res if r["table"] == "fp32")
            for r in res:
                # ratios of thread CPU time: the steadier estimate on a shared machine (common.Clock)
                r["step_vs_fp32"] = r["step_cpu_ms"] / ref["step_cpu_ms"]
                r["pool_vs_fp32"] = r["pool_cpu_ms"] / ref["pool_cpu_ms"]
                r["bytes_vs_fp32"] = r["value_bytes"] / ref["value_bytes"]
            out += res
            line = ", ".join(f"{r['table']} {r['step_cpu_ms']:.2f}/{r['pool_cpu_ms']:.3f}" for r in res)
            print(f"B={B} (step/lookup CPU ms): {line}", flush=True)
        del tables
    return out


# ---------------------------------------------------------------- the big table

def ensure_big_file(path: Path, num_keys: int, value_dim: int, cores: int = 2) -> float:
    """Write the 20M-value table block by block unless a fitting file is there; returns seconds."""
    rows, width = num_keys * num_keys * cores, value_dim // cores
    try:
        if read_table_header(path)[1] == (rows, width):
            return 0.0
    except ValueError:
        pass
    t0, gen, block = time.perf_counter(), torch.Generator().manual_seed(0), 1 << 20
    blocks = (torch.randn(min(block, rows - i), width, generator=gen) * 0.02 for i in range(0, rows, block))
    write_table_file(path, (rows, width), torch.float32, blocks)
    return time.perf_counter() - t0


def run_worker(path: Path, mode: str, a) -> dict:
    cmd = [sys.executable, "-m", "ultramem.bench.serve_big", "--file", str(path), "--mode", mode,
           "--batches", ",".join(map(str, a.big_batches)), "--num-keys", str(a.big_keys),
           "--value-dim", str(BIG["value_dim"]), "--budget-s", str(a.budget_s),
           "--map-budget-mb", str(a.map_budget_mb)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    if res.returncode:
        raise RuntimeError(f"serve_big {mode} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) / 2 ** 20


def big_part(a) -> dict:
    path = Path(a.big_file or Path(a.out) / "big.values.safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    table_gb = a.big_keys ** 2 * BIG["value_dim"] * 4 / 2 ** 30
    write_s = ensure_big_file(path, a.big_keys, BIG["value_dim"])
    out = {"file": str(path), "table_GB": table_gb, "write_s": write_s}
    print(f"big table file {path} ({table_gb:.2f} GB) written in {out['write_s']:.0f}s", flush=True)
    out["disk"] = run_worker(path, "disk", a)
    print(f"disk worker: {json.dumps(out['disk'])}", flush=True)
    if mem_available_gb() > table_gb + 6:
        out["both"] = run_worker(path, "both", a)
        print(f"in-memory vs offloaded worker: {json.dumps(out['both'])}", flush=True)
    else:
        out["both"] = None
        print(f"skipped in-memory comparison: {mem_available_gb():.1f} GB available", flush=True)
    if not a.keep_big_file and not a.big_file:
        path.unlink(missing_ok=True)
    return out


# ---------------------------------------------------------------- quality

def quality_part(run: str) -> dict:
    """Val loss / fact recall of a trained run with its tables as fp32, bf16 and each quantisation."""
    from ..data import DataConfig, prepare_data
    from ..eval import evaluate
    from ..runs import load_run
    from ..train import TrainConfig, autocast_for

    model, run_cfg, _, ckpt = load_run(run, "cpu")
    tc = TrainConfig(**{**run_cfg["train"], "device": "cpu"})
    data = prepare_data(DataConfig.from_dict(run_cfg["data"]), tc.cache_dir, log=lambda m: None)
    amp = autocast_for(tc.dtype, torch.device("cpu"))
    out = {"checkpoint": str(ckpt.path), "step": ckpt.step}
    for kind in ("fp32", "bf16", *KINDS):
        m = load_run(run, "cpu")[0]  # a fresh load each (a deepcopy trips the Tucker-refresh check)
        if kind == "bf16":
            for layer in memory_layers(m):
                layer.values.to(torch.bfloat16)
        elif kind != "fp32":
            quantize_values(m, kind)
        res = evaluate(m, data, tc, amp)
        out[kind] = {k: res[k] for k in ("val_loss", "fact_acc") if k in res}
        print(f"quality {kind}: {out[kind]}", flush=True)
    for kind in ("bf16", *KINDS):
        out[kind]["val_loss_delta"] = out[kind]["val_loss"] - out["fp32"]["val_loss"]
    return out


# ---------------------------------------------------------------- report

def targets(layer_rows: list[dict], big: dict | None, quality: dict | None) -> dict:
    int8 = [r for r in layer_rows if r["table"] == "int8"]
    small = [r for r in int8 if r["B"] <= 64]
    t = {}
    if int8:
        t = {"int8_bytes_ratio": max(r["bytes_vs_fp32"] for r in int8),
             "int8_step_ratio_max_B1_64": max(r["step_vs_fp32"] for r in small),
             "int8_pool_ratio_max_B1_64": max(r["pool_vs_fp32"] for r in small)}
    if quality:
        t["int8_val_loss_delta"] = quality["int8"]["val_loss_delta"]
    if big:
        t["big_peak_rss_MB"] = big["disk"]["end"]["rss_peak_MB"]
        # the layer's IVE permutation (E * N int64) is not the table: shown apart
        t["big_peak_rss_minus_perm_MB"] = t["big_peak_rss_MB"] - big["disk"]["perm_MB"]
        if big.get("both"):
            b1 = big["both"]["batches"][min(big["both"]["batches"], key=int)]
            t["big_B1_offloaded_vs_in_memory"] = b1["offloaded"] / b1["in_memory"]
            t["big_B1_offloaded_vs_in_memory_cpu"] = b1["offloaded_cpu"] / b1["in_memory_cpu"]
    return t


def markdown(layer_rows: list[dict], big: dict | None, quality: dict | None) -> str:
    f = common.fmt_num
    parts = [] if not layer_rows else [common.markdown_table(
        ["B", "table", "step ms (wall)", "step CPU ms", "x fp32", "lookup CPU ms", "x fp32", "value KB/step",
         "x fp32"],
        [[r["B"], r["table"], f(r["step_ms"]), f(r["step_cpu_ms"]), f(r["step_vs_fp32"]), f(r["pool_cpu_ms"]),
          f(r["pool_vs_fp32"]), f(r["value_bytes"] / 1024), f(r["bytes_vs_fp32"])] for r in layer_rows])]
    if big:
        rows = []
        for B, r in big["disk"]["batches"].items():
            both = (big.get("both") or {}).get("batches", {}).get(B, {})
            rows.append([B, f(r["cold_ms"]), f(r["offloaded"]), f(both.get("offloaded")),
                         f(both.get("in_memory")), f(r["rss_peak_MB"])])
        parts.append(common.markdown_table(
            ["B", "cold ms", "offloaded ms (disk run)", "offloaded ms", "in-memory ms", "peak RSS MB"], rows))
    if quality:
        parts.append(common.markdown_table(
            ["table", "val loss", "delta", "fact acc"],
            [[k, f"{v['val_loss']:.4f}", f"{v.get('val_loss_delta', 0):+.4f}", f(v.get("fact_acc"))]
             for k, v in quality.items() if isinstance(v, dict)]))
    return "\n\n".join(parts)


def parse(argv):
    p = argparse.ArgumentParser(prog="ultramem bench serve", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_out/serve")
    p.add_argument("--quick", action="store_true", help="fewer batches, short budgets, a 1M-value big table")
    p.add_argument("--checkpoint", help="trained run dir / checkpoint for the quality part")
    p.add_argument("--skip-big", action="store_true")
    p.add_argument("--skip-layer", action="store_true", help="only the big table (and quality)")
    p.add_argument("--map-budget-mb", type=float, default=256,
                   help="the big table's worker unmaps touched pages past this (OffloadedValueTable)")
    p.add_argument("--big-keys", type=int, default=BIG["num_keys"], help="big table: num_keys^2 values")
    p.add_argument("--big-file", help="where to write (and keep) the big table file")
    p.add_argument("--keep-big-file", action="store_true")
    p.add_argument("--budget-s", type=float, default=2.0, help="timed seconds per batch group")
    p.add_argument("--inputs", type=int, default=8, help="distinct inputs per batch group")
    a = p.parse_args(argv)
    a.batches = (1, 4, 16, 64, 256) if a.quick else (1, 2, 4, 8, 16, 32, 64, 128, 256)
    a.big_batches = (1, 64) if a.quick else (1, 8, 64, 256)
    if a.quick:
        a.budget_s, a.inputs, a.big_keys = min(a.budget_s, 0.5), min(a.inputs, 4), min(a.big_keys, 1000)
    return a


def main(argv=None) -> int:
    a = parse(argv)
    torch.set_num_threads(1)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    layer_rows = [] if a.skip_layer else layer_part(a)
    big = None if a.skip_big else big_part(a)
    quality = quality_part(a.checkpoint) if a.checkpoint else None
    md = markdown(layer_rows, big, quality)
    print(md)
    res = {"bench": "serve", "layer": LAYER, "rows": layer_rows, "big": big, "quality": quality,
           "targets": TARGETS, "measured": targets(layer_rows, big, quality),
           "seconds": time.perf_counter() - t0}
    (Path(a.out) / "serve.json").write_text(json.dumps(res, indent=1))
    (Path(a.out) / "serve.md").write_text(md + "\n")
    print(json.dumps({"bench": "serve", "measured": res["measured"], "targets": TARGETS}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
