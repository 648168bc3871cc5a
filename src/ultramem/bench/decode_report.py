"""Report of a decode benchmark run (bench/decode.py): targets, markdown tables, PNG plots, files.

A run is a dict (the JSON written to decode.json): "records" holds one entry per (level, sweep,
candidate, batch, ratio) with the latency spread, tokens/s and the bytes the step touched.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import common

TARGETS = {"speedup_vs_moe": 3.0, "layer_growth_x16": 1.6, "model_growth_x16": 1.2, "vs_dense": 2.0}
DETAIL_BATCHES = (1, 8, 64, 256, 1024)
KEYS = ("median_ms", "min_ms", "cpu_median_ms")  # wall median, fastest repeat, thread CPU time median


def select(rep: dict, level: str, sweep: str, name: str | None = None, B=None, ratio=None) -> list[dict]:
    return [r for r in rep["records"] if r["level"] == level and r["sweep"] == sweep
            and (name is None or r["name"] == name) and (B is None or r["B"] == B)
            and (ratio is None or r["ratio"] == ratio)]


def _med(rep, level, sweep, name, B, ratio=None, key="median_ms") -> float | None:
    rs = select(rep, level, sweep, name, B, ratio)
    return rs[0].get(key) if rs else None


def _ratios(rep, level, num, den, batches, key="median_ms") -> dict[int, float]:
    out = {}
    for B in batches:
        a, b = _med(rep, level, "batch", num, B, key=key), _med(rep, level, "batch", den, B, key=key)
        if a and b:
            out[B] = a / b
    return out


def evaluate_targets(rep: dict) -> list[dict]:
    """The issue's targets, each {target, value, limit, met, detail}; met is None when unmeasured.

    Judged on wall-clock medians; the detail also gives the same ratio of the fastest repeats
    ("min") and, with one CPU thread, of the median thread CPU time ("cpu"): on a shared machine
    those two are the better estimates of the unloaded speed."""
    sh, out = rep["shapes"], []

    def add(target, value, limit, at_least, detail):
        met = None if value is None else (value >= limit if at_least else value <= limit)
        out.append({"target": target, "value": value, "limit": limit, "met": met, "detail": detail})

    Bs = [B for B in sh["batches"] if 8 <= B <= 256]
    speed, fast, cpu = (_ratios(rep, "layer", "moe", "ultramem", Bs, k) for k in KEYS)
    add("layer: UltraMem >= 3x faster than grouped MoE, B 8..256", min(speed.values(), default=None),
        TARGETS["speedup_vs_moe"], True, {**{f"B={B}": v for B, v in speed.items()},
                                          "worst B by min": min(fast.values(), default=None),
                                          "worst B by cpu": min(cpu.values(), default=None),
                                          **{f"cpu B={B}": v for B, v in cpu.items()}})
    Bs = [B for B in sh["batches"] if B <= 64]
    vs, fast, cpu = (_ratios(rep, "layer", "ultramem", "dense", Bs, k) for k in KEYS)
    add("layer: UltraMem time <= 2x dense FFN of equal activated params, B <= 64",
        max(vs.values(), default=None), TARGETS["vs_dense"], False,
        {**{f"B={B}": v for B, v in vs.items()}, "worst B by min": max(fast.values(), default=None),
         "worst B by cpu": max(cpu.values(), default=None), **{f"cpu B={B}": v for B, v in cpu.items()}})
    lo, hi, B = min(sh["ratios"]), max(sh["ratios"]), sh["sweep_batch"]
    for level in ("layer", "model"):
        top = _med(rep, level, "ratio", "ultramem", B, hi)
        same = _med(rep, level, "ratio", "ultramem_anchor", B, hi)  # x<lo> timed in the same window
        own = _med(rep, level, "ratio", "ultramem", B, lo)
        top_min, same_min, top_cpu, same_cpu = (_med(rep, level, "ratio", n, B, hi, k) for k in KEYS[1:]
                                                for n in ("ultramem", "ultramem_anchor"))
        moe_lo, moe_hi = _med(rep, level, "ratio", "moe", B, lo), _med(rep, level, "ratio", "moe", B, hi)
        add(f"{level}: UltraMem time growth x{lo:g} -> x{hi:g} sparse params ({hi / lo:g}x), B={B}",
            top / same if top and same else None, TARGETS[f"{level}_growth_x16"], False,
            {"separate_windows": top / own if top and own else None,
             "by min": top_min / same_min if top_min and same_min else None,
             "by cpu": top_cpu / same_cpu if top_cpu and same_cpu else None,
             "moe_growth": moe_hi / moe_lo if moe_lo and moe_hi else None})
    return out


def _M(n) -> str:
    return f"{n / 1e6:.2f}M"


def _model_desc(cfg: dict) -> str:
    if cfg["ffn"] == "dense":
        return f"SwiGLU {cfg['ffn_hidden']}"
    if cfg["ffn"] == "moe":
        return f"{cfg['moe_experts']} experts x {cfg['moe_hidden']}, top-{cfg['moe_topk']}"
    return (f"SwiGLU {cfg['ffn_hidden']} + {cfg['ffn']} at {cfg['memory_placement']}, "
            f"n={cfg['memory']['num_keys']}")


def _config_rows(rep: dict, section: str) -> list[list]:
    rows = []
    for n, c in rep["configs"][section].items():
        cfg = c.get("config", {})
        desc = _model_desc(cfg) if section == "model" else json.dumps(cfg, sort_keys=True)
        rows.append([n, c["kind"], _M(c["total"]), _M(c["activated"]), _M(c["sparse"]), desc])
    return rows


def _batch_tables(rep: dict, level: str) -> list[str]:
    f, recs = common.fmt_num, select(rep, level, "batch")
    if not recs:
        return []
    names = list(dict.fromkeys(r["name"] for r in recs))
    Bs = sorted({r["B"] for r in recs})
    ctx = f", KV cache {rep['shapes']['ctx']}" if level == "model" else ""
    out = []
    tables = [("median latency, ms", "median_ms", 1), ("MB read per step", "bytes_total", 1e-6)]
    if all("cpu_median_ms" in r for r in recs):
        tables.insert(1, ("median thread CPU time, ms (1 thread: the unloaded-speed estimate)",
                          "cpu_median_ms", 1))
    for what, key, scale in tables:
        rows = [[n] + [f(next((r[key] * scale for r in recs if r["name"] == n and r["B"] == B), None))
                       for B in Bs] for n in names]
        out += ["", f"## {level.title()} level, {what}, by batch{ctx}", "",
                common.markdown_table(["candidate"] + [f"B={B}" for B in Bs], rows)]
    rows = [[r["name"], r["B"], f(r["median_ms"]), f"{f(r['p25_ms'])}-{f(r['p75_ms'])}", f(r["min_ms"]),
             f(r.get("cpu_median_ms")), r["reps"], f(r["tokens_per_s"]), f(r["bytes_total"] / 1e6),
             f"{r['GBps']:.2f}", f"{r['pct_copy']:.0f}%"] for r in recs if r["B"] in DETAIL_BATCHES]
    out += ["", f"## {level.title()} level detail", "", common.markdown_table(
        ["candidate", "B", "median ms", "p25-p75 ms", "min ms", "CPU ms", "reps", "tokens/s", "MB read",
         "GB/s", "of copy bw"], rows)]
    return out


def _ratio_table(rep: dict, level: str) -> list[str]:
    f, recs, sh = common.fmt_num, select(rep, level, "ratio"), rep["shapes"]
    if not recs:
        return []
    rows = []
    for ratio in sorted({r["ratio"] for r in recs}):
        get = {r["name"]: r for r in recs if r["ratio"] == ratio}
        um, anc = get.get("ultramem"), get.get("ultramem_anchor")
        cells = [f(get[n]["median_ms"]) if n in get else "-" for n in ("dense", "moe", "ultramem")]
        cpu = um and anc and um.get("cpu_median_ms") and anc.get("cpu_median_ms")
        rows.append([f"x{ratio:g}", *cells, f(um["median_ms"] / anc["median_ms"]) if um and anc else "1",
                     f(um["cpu_median_ms"] / anc["cpu_median_ms"]) if cpu else "-",
                     f(get["moe"]["bytes_total"] / 1e6) if "moe" in get else "-",
                     f(um["bytes_total"] / 1e6) if um else "-"])
    head = ["sparse/dense", "dense ms", "MoE ms", "UltraMem ms",
            f"UltraMem / x{min(sh['ratios']):g} (same window)", "the same, CPU time", "MoE MB", "UltraMem MB"]
    return ["", f"## {level.title()} level, sparse-ratio sweep at B={sh['sweep_batch']}", "",
            common.markdown_table(head, rows)]


def format_markdown(rep: dict) -> str:
    f, bw = common.fmt_num, rep["bandwidth"]
    out = [f"# Decode benchmark: {rep['device']}, {rep['dtype']}, {rep['threads']} threads, "
           f"torch {rep['torch']}", "",
           f"Copy bandwidth {bw['copy_GBps']:.1f} GB/s (read+write), read {bw['read_GBps']:.1f} GB/s; "
           f"load average at the end {rep['loadavg']}; the run took {rep['seconds']:.0f} s. Latency = median "
           f"of interleaved repeats (spread in the JSON); bytes = what the step touched (accounting.py).", ""]
    out += [f"- {k}: {v}" for k, v in rep["notes"].items()]
    for section, title in (("layer", "Layer-level candidates"), ("model", "Model-level candidates")):
        if section in rep["configs"]:
            out += ["", f"## {title}", "", common.markdown_table(
                ["name", "kind", "total params", "activated / token", "sparse", "config"],
                _config_rows(rep, section), "llrrrl")]
    for level in ("layer", "model"):
        out += _batch_tables(rep, level)
    for level in ("layer", "model"):
        out += _ratio_table(rep, level)
    if rep["generation"]:
        rows = [[g["models"], g["name"], g["B"], g["new_tokens"], f(g["median_ms"]), f(g["tokens_per_s"])]
                for g in rep["generation"]]
        out += ["", "## Generation (greedy `generate`, KV cache)", "", common.markdown_table(
            ["models", "name", "B", "new tokens", "median ms", "tokens/s"], rows, "llrrrr")]
    verdict = {True: "met", False: "MISSED", None: "n/a"}
    rows = [[t["target"], f(t["value"]), f"{t['limit']:g}", verdict[t["met"]],
             ", ".join(f"{k} {f(v)}" for k, v in t["detail"].items())] for t in rep["targets"]]
    out += ["", "## Targets", ""]
    if rep.get("quick"):
        out += ["(--quick: tiny shapes; the targets are defined for the full-size run)", ""]
    out += [common.markdown_table(["target", "value", "limit", "", "detail"], rows, "lrrll")]
    return "\n".join(out) + "\n"


def _series(recs: list[dict], x: str, y: str, names, scale: float = 1.0) -> dict:
    return {n: ([r[x] for r in recs if r["name"] == n], [r[y] * scale for r in recs if r["name"] == n])
            for n in names}


def make_plots(rep: dict, out_dir: Path) -> list[Path]:
    lab = {"layer": "layer (FFN side of one block)", "model": f"model step (KV cache {rep['shapes']['ctx']})"}
    panels = {"latency": [], "bytes": [], "ratio": []}
    for level in ("layer", "model"):
        recs = select(rep, level, "batch")
        if recs:
            names = list(dict.fromkeys(r["name"] for r in recs))
            common_kw = {"title": lab[level], "xlabel": "batch (sequences, one new token each)",
                         "logx": True, "logy": True}
            common_kw["dashed"] = [n for n in names if n.endswith(("_peer", "_mem")) or n.startswith("hf_")]
            panels["latency"].append({**common_kw, "ylabel": "median latency, ms",
                                      "series": _series(recs, "B", "median_ms", names)})
            if level == "layer" and all("cpu_median_ms" in r for r in recs):
                panels["latency"].append({**common_kw, "title": "layer, thread CPU time (1 thread)",
                                          "ylabel": "median thread CPU time, ms",
                                          "series": _series(recs, "B", "cpu_median_ms", names)})
            panels["bytes"].append({**common_kw, "ylabel": "MB read per step",
                                    "series": _series(recs, "B", "bytes_total", names, 1e-6)})
        recs = select(rep, level, "ratio")
        if recs:
            names = [n for n in ("dense", "moe", "ultramem", "ultramem_anchor")
                     if select(rep, level, "ratio", n)]
            panels["ratio"].append({"title": f"{lab[level]}, B={rep['shapes']['sweep_batch']}",
                                    "xlabel": "sparse params / dense FFN params",
                                    "ylabel": "median latency, ms", "logx": True, "logy": True,
                                    "dashed": ["ultramem_anchor"],
                                    "series": _series(recs, "ratio", "median_ms", names)})
    paths = []
    for key, fname in (("latency", "latency_vs_batch.png"), ("bytes", "bytes_vs_batch.png"),
                       ("ratio", "latency_vs_ratio.png")):
        if panels[key]:
            title = f"{rep['device']}, {rep['dtype']}, {rep['threads']} torch thread(s), {rep['torch']}"
            common.line_plots(out_dir / fname, panels[key], title)
            paths.append(out_dir / fname)
    return paths


def write_outputs(rep: dict, out_dir) -> dict:
    """decode.json (every measurement), decode.md, the PNGs and profiles.txt (when profiled)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "decode.json").write_text(json.dumps(rep, separators=(",", ":"), default=str) + "\n")
    (out_dir / "decode.md").write_text(format_markdown(rep))
    plots = make_plots(rep, out_dir)
    if rep["profiles"]:
        (out_dir / "profiles.txt").write_text("\n\n".join(f"== {k}\n{v}" for k, v in rep["profiles"].items()))
    return {"json": out_dir / "decode.json", "markdown": out_dir / "decode.md", "plots": plots}
