"""Decode-speed benchmark of UltraMem (v1 and V2), MoE, Dense and PKM (and the public peers), one new
token a step.

Layer and full-model level, one new token per sequence, with bytes-read accounting, plots, targets.

Run: ultramem bench decode [--quick] [--out DIR]   (or python -m ultramem.bench.decode ...)

What is measured (SPEC section 7, issue 4), all candidates of a group interleaved (common.py):
- layer level: the FFN side of one block on a (B, 1, D) input, B = 1 .. 1024;
- model level: one decode step of a small LM (KV cache of `ctx` positions, shared by all
  candidates, rewound after every step so each step sees the same context length);
- sparse-ratio sweep at a fixed batch: sparse params = ratio x the dense FFN's params; each ratio
  is its own group [dense, moe_r, ultramem_r, ultramem_x<min>], so the growth of UltraMem's time
  is read against its smallest table measured in the same window;
- generation: tokens/s of LanguageModel.generate at batch 1 and 32 for the matched tiny presets
  (ultramem.presets) and the model-level bench models.
Bytes per step come from what the step touched (accounting.py). Matched configs (`matched`):
Dense = SwiGLU(topk * expert width); MoE = experts of that width, top-k, grouped kernel;
UltraMem / PKM / UltraMemV2 = a narrower SwiGLU plus the memory (V2: one beside every block's
FFN in the LM), sized so that activated params (per token) AND
total params equal the MoE's (closed form below); `*_mem` rows are the memory alone, beside the
public peers built at the same memory shape.

Shape legend: B batch (sequences, one new token each), D model width.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .. import PKMConfig, PKMLayer, UltraMemConfig, UltraMemLayer, UltraMemV2Config, UltraMemV2Layer
from ..counting import count_params
from ..ffn import MoE, SwiGLU
from ..model import LanguageModel, LMConfig
from . import common
from .accounting import Recorder, kv_cache_bytes, layer_param_counts, match_memory, moe_slot_counts
from .decode_report import evaluate_targets, format_markdown, write_outputs
from .peers import peer_pkm, peer_ultra_mem, peer_version

DISTINCT_INPUTS = 61  # fresh inputs per group; repeats beyond cycle through them


@dataclass
class Shapes:
    dim: int = 512
    expert_hidden: int = 1024
    experts: int = 64  # base: sparse/dense ratio = experts / moe_topk (x32)
    moe_topk: int = 2
    um: dict = field(default_factory=lambda: dict(key_dim=64, value_dim=256, heads=2, topk=32,
                                                  value_expansion=4))
    pkm: dict = field(default_factory=lambda: dict(key_dim=256, heads=4, topk=32, query_norm="layer"))
    # UltraMemV2: v1's D_k and m doubled on one head, D_p : D_v = 1 : 3. share_group=1: every
    # layer of a bench LM has its own pool, so `matched` sizes it like v1 (a shared pool would hold
    # the same rows in one table addressed by more keys; reads per token are the same).
    v2: dict = field(default_factory=lambda: dict(key_dim=128, heads=1, topk=64, value_dim=192,
                                                  pre_value_dim=64, share_group=1))
    # UltraMem n is kept even: n' = 2n then stays a multiple of 4, which retrieval's block top-k
    # needs (at n' % 4 != 0 it falls back to one plain top-k, ~20% slower at B >= 64 on CPU).
    um_keys_multiple: int = 2
    batches: tuple = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
    ratios: tuple = (4, 8, 16, 32, 64)
    sweep_batch: int = 64
    vocab: int = 8192
    n_layers: int = 4
    n_heads: int = 8
    placement: str = "0:1/2:3"
    ctx: int | None = None  # default 2048 on a GPU, 512 on CPU
    max_kv_gb: float | None = None  # model-level batches whose KV cache is larger are skipped
    gen_batches: tuple = (1, 32)
    gen_prompt: int = 8
    gen_new: int = 16
    budget_s: float = 12.0  # seconds of timed repeats per layer group (reps = budget / one round)
    model_budget_s: float = 6.0  # the same for a model-level group
    min_reps: int = 5
    max_reps: int = 301  # cheap groups spread up to this many repeats over their budget
    warmup: int = 2
    copy_mb: int = 512  # buffer of the copy-bandwidth measurement
    gen_presets: bool = True  # also time generate for the tiny presets (ultramem.presets)


def quick_shapes() -> Shapes:
    return Shapes(dim=64, expert_hidden=128, experts=16, um=dict(key_dim=16, value_dim=32, heads=2,
                  topk=8, value_expansion=4), pkm=dict(key_dim=32, heads=2, topk=8, query_norm="layer"),
                  v2=dict(key_dim=16, heads=1, topk=16, value_dim=24, pre_value_dim=8, share_group=1),
                  batches=(1, 8, 64), ratios=(4, 16), sweep_batch=8, vocab=256, n_layers=2, n_heads=2,
                  placement="0:1", ctx=32, gen_new=8, budget_s=0.3, model_budget_s=0.3, min_reps=3,
                  max_reps=5, warmup=1, copy_mb=64)


# ----------------------------------------------------------------------------- matched configs


def matched(kind: str, sh: Shapes, mem_per_slot: float, experts: int, ffn_hidden: int | None = None):
    """(n, w) of a memory FFN slot matched to the MoE with `experts` (accounting.match_memory)."""
    T, A = moe_slot_counts(sh.dim, sh.expert_hidden, experts, sh.moe_topk)
    fields = _fields(sh, kind)
    multiple = sh.um_keys_multiple if kind in ("ultramem", "ultramem_v2") else 1
    return match_memory(kind, sh.dim, fields, T, A, mem_per_slot, ffn_hidden, multiple)


def _fields(sh: Shapes, kind: str) -> dict:
    return {"ultramem": sh.um, "ultramem_v2": sh.v2, "pkm": sh.pkm}[kind]


def _memory(kind: str, dim: int, fields: dict) -> nn.Module:
    if kind == "ultramem":
        return UltraMemLayer(UltraMemConfig(dim=dim, **fields))
    if kind == "ultramem_v2":
        return UltraMemV2Layer(UltraMemV2Config(dim=dim, **fields))
    return PKMLayer(PKMConfig(dim=dim, **fields))


def experts_at(sh: Shapes, ratio: int) -> int:
    return max(sh.moe_topk, round(ratio * sh.moe_topk))


# ----------------------------------------------------------------------------- candidates


class MemoryBlock(nn.Module):
    """FFN side of a block of a memory model: a narrow SwiGLU and the memory on the same input."""

    def __init__(self, ffn: nn.Module, memory: nn.Module):
        super().__init__()
        self.ffn, self.memory = ffn, memory

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.ffn(x_BTD) + self.memory(x_BTD)


@dataclass
class Cand:
    name: str
    kind: str  # dense | moe | ultramem | pkm | peer
    module: nn.Module
    call: object  # x -> y
    counts: dict
    config: dict
    bytes_fn: object = None  # x -> dict with "total" (None: record with accounting.Recorder)
    ratio: float | None = None


def _layer_cands(sh: Shapes, ratio: int, dev, dtype, kinds=("dense", "moe", "ultramem", "pkm", "ultramem_v2"),
                 mem_alone: bool = False, widths: dict | None = None, suffix: str = "") -> list[Cand]:
    """Layer-level candidates at a sparse ratio; widths pins the narrow SwiGLU widths (sweep)."""
    D, E = sh.dim, experts_at(sh, ratio)
    out = []

    def add(name, kind, module, cfg, call=None):
        module = module.to(dev, dtype).eval()
        out.append(Cand(name + suffix, kind, module, call or module, layer_param_counts(module), cfg,
                        ratio=ratio))

    for kind in kinds:
        if kind == "dense":
            hidden = sh.moe_topk * sh.expert_hidden
            add("dense", "dense", SwiGLU(D, hidden), {"hidden": hidden})
        elif kind == "moe":
            moe = MoE(D, sh.expert_hidden, E, sh.moe_topk)
            add("moe", "moe", moe, {"experts": E, "topk": sh.moe_topk, "hidden": sh.expert_hidden,
                                    "path": "grouped"}, call=lambda x, m=moe: m(x, path="grouped"))
        else:
            n, w = matched(kind, sh, 1.0, E, None if widths is None else widths[kind])
            fields = dict(_fields(sh, kind), num_keys=n)
            mem = _memory(kind, D, fields)
            add(kind, kind, MemoryBlock(SwiGLU(D, w), mem), {"ffn_hidden": w, "memory": fields})
            if mem_alone:
                add(f"{kind}_mem", kind, out[-1].module.memory, {"memory": fields})
    return out


def _peer_cands(sh, ours, dev, dtype, experts, notes) -> list[Cand]:

    by_name = {c.name: c for c in ours}
    out = []
    for module, name, build, mem in (("ultra_mem", "ultra_mem_peer", peer_ultra_mem, "ultramem_mem"),
                                     ("product_key_memory", "pkm_peer", peer_pkm, "pkm_mem")):
        ok, notes[module] = peer_version(module)
        if not ok or mem not in by_name:
            continue
        fields = dict(by_name[mem].config["memory"])
        lb = build(sh.dim, fields)  # layer_bench.Candidate, sized to the same value params
        peer = lb.module.to(dev, dtype).eval()
        total = sum(p.numel() for p in peer.parameters())
        counts = {"total": total, "sparse": lb.sparse_params,
                  "activated": total - lb.sparse_params + lb.rows_per_token * lb.row_bytes // 4}
        elsize = torch.empty((), dtype=dtype).element_size()
        bytes_fn = _peer_bytes(module, peer, lb, elsize)
        out.append(Cand(name, "peer", peer, lb.call, counts, lb.config, bytes_fn))
    try:
        out.append(_hf_moe(sh, dev, dtype, experts, notes))
    except ImportError as e:
        notes["transformers"] = f"skipped: transformers not importable ({e})"
    return out


def _peer_bytes(module: str, peer, lb, elsize):
    """Bytes of a peer's step: its distinct value rows (full width) + all its other parameters.

    ultra-mem returns (out, row ids (heads, B, T, topk), aux) with one table per head, so a row is a
    (head, id) pair; product-key-memory's rows are the ids fed to its value bag (a forward hook)."""
    values = {id(p) for p in lb.value_params}
    fixed = sum(p.numel() * p.element_size() for p in peer.parameters() if id(p) not in values)
    row_bytes = lb.row_bytes // 4 * elsize  # layer_bench counts fp32 rows

    def rows(x) -> int:
        if module == "ultra_mem":
            idx = peer(x)[1]
            heads = torch.arange(idx.shape[0], device=idx.device).view(-1, *([1] * (idx.ndim - 1)))
            return int(torch.unique(heads * peer.num_virtual_mems + idx).numel())
        return common.pkm_peer_rows_read(peer, x)

    def bytes_fn(x):
        n = rows(x)
        return {"dense_weights": fixed, "value_rows": n * row_bytes, "distinct_rows": n,
                "total": fixed + n * row_bytes}
    return bytes_fn


def _hf_moe(sh, dev, dtype, experts, notes) -> Cand:
    import transformers
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    kw = dict(hidden_size=sh.dim, intermediate_size=sh.expert_hidden, num_local_experts=experts,
              num_experts_per_tok=sh.moe_topk)
    try:  # the grouped kernel when this version has one (the fair peer), else its default loop
        cfg = MixtralConfig(**kw, experts_implementation="grouped_mm")
        impl = "grouped_mm"
    except (TypeError, ValueError, KeyError):
        cfg, impl = MixtralConfig(**kw), "default"
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(std=0.02)
    block = block.to(dev, dtype).eval()
    notes["transformers"] = f"transformers {transformers.__version__} MixtralSparseMoeBlock, experts {impl}"
    return Cand("hf_mixtral", "peer", block, block, layer_param_counts(block), {**kw, "experts_impl": impl})


def _lm_config(kind: str, sh: Shapes, ratio: int, widths: dict | None = None) -> LMConfig:
    E = experts_at(sh, ratio)
    base = dict(vocab_size=sh.vocab, dim=sh.dim, n_layers=sh.n_layers, n_heads=sh.n_heads,
                max_seq_len=max(sh.ctx + 1, sh.gen_prompt + sh.gen_new))
    if kind == "dense":
        return LMConfig(**base, ffn="dense", ffn_hidden=sh.moe_topk * sh.expert_hidden)
    if kind == "moe":
        return LMConfig(**base, ffn="moe", moe_experts=E, moe_topk=sh.moe_topk, moe_hidden=sh.expert_hidden)
    f = 1.0 if kind == "ultramem_v2" else len(sh.placement.split("/")) / sh.n_layers
    n, w = matched(kind, sh, f, E, None if widths is None else widths[kind])
    fields = dict(_fields(sh, kind), num_keys=n)
    if kind == "ultramem_v2":  # a memory beside every block's FFN
        return LMConfig(**base, ffn=kind, ffn_hidden=w, memory=fields)
    return LMConfig(**base, ffn=kind, ffn_hidden=w, memory_placement=sh.placement, memory=fields)


def _model_cand(name, kind, cfg: LMConfig, dev, dtype, ratio) -> Cand:
    model = LanguageModel(cfg).to(dev, dtype).eval()
    c = count_params(model)
    counts = {"total": c["total"], "sparse": c["sparse"], "activated": c["activated"],
              "activated_with_embedding": c["activated_with_embedding"]}
    return Cand(name, kind, model, None, counts, {k: v for k, v in cfg.to_dict().items()
                                                 if k not in ("dropout", "rope_theta")}, ratio=ratio)


# ----------------------------------------------------------------------------- measuring


class Bench:
    """One run: device, dtype, clock, bandwidth, and every measurement record."""

    def __init__(self, sh: Shapes, dev: torch.device, dtype: torch.dtype, seed: int = 0):
        self.sh, self.dev, self.dtype, self.clock = sh, dev, dtype, common.Clock(dev)
        self.gen = torch.Generator().manual_seed(seed)
        self.records: list[dict] = []
        self.copy_GBps = float("nan")
        self.profiles: dict[str, str] = {}

    def layer_group(self, cands: list[Cand], B: int, sweep: str, profile: bool = False,
                    ratio: float | None = None) -> None:
        xs = [torch.randn(B, 1, self.sh.dim, generator=self.gen).to(self.dev, self.dtype)
              for _ in range(min(self.sh.max_reps, DISTINCT_INPUTS))]
        fns, cpu = {c.name: c.call for c in cands}, {}
        with torch.inference_mode():
            times = common.time_interleaved(fns, xs, self.clock, self.sh.warmup, self.sh.min_reps,
                                            self.sh.max_reps, self.sh.budget_s, cpu)
            for c in cands:
                if c.bytes_fn is not None:
                    b = c.bytes_fn(xs[0])
                else:
                    with Recorder(c.module) as rec:
                        c.call(xs[0])
                    b = rec.step_bytes(c.module)
                self._record("layer", sweep, c, B, times[c.name], b, ratio, cpu.get(c.name))
            if profile:
                for c in cands:
                    if c.name in ("dense", "moe", "ultramem", "ultramem_mem"):
                        self.profiles[f"layer {c.name} B={B}"] = profile_table(c.call, xs[0])

    def model_group(self, cands: list[Cand], B: int, sweep: str, ratio: float | None = None) -> None:
        sh, ctx = self.sh, self.sh.ctx
        cache = cands[0].module.new_kv_cache(B, ctx + 1)  # shared: all candidates have one layout
        cache.pos = ctx
        xs = [torch.randint(0, sh.vocab, (B, 1), generator=self.gen).to(self.dev)
              for _ in range(min(sh.max_reps, DISTINCT_INPUTS))]

        fns = {c.name: _decode_step(c.module, cache, ctx) for c in cands}
        elsize = torch.empty((), dtype=self.dtype).element_size()
        cpu = {}
        with torch.inference_mode():
            times = common.time_interleaved(fns, xs, self.clock, sh.warmup, sh.min_reps, sh.max_reps,
                                            sh.model_budget_s, cpu)
            for c in cands:
                with Recorder(c.module) as rec:
                    fns[c.name](xs[0])
                b = rec.step_bytes(c.module)
                b["kv_cache"] = kv_cache_bytes(sh.n_layers, B, ctx + 1, sh.dim, elsize)
                b["total"] += b["kv_cache"]
                self._record("model", sweep, c, B, times[c.name], b, ratio, cpu.get(c.name))
        del cache

    def _record(self, level, sweep, c: Cand, B, ts, b, ratio=None, cpu_ts=None) -> None:
        """ratio: the group's sparse ratio (a sweep group's anchor keeps its own in `own_ratio`).
        cpu_ts: thread CPU seconds of the same calls, kept only with one torch thread (then they
        cover all the work; with more threads they would miss the workers' share)."""
        s = common.spread(ts)
        if cpu_ts and torch.get_num_threads() == 1:
            s.update({f"cpu_{k}": v for k, v in common.spread(cpu_ts).items() if k != "reps"})
        total = b["total"]
        gbps = total / (s["median_ms"] / 1e3) / 1e9
        self.records.append({"level": level, "sweep": sweep, "name": c.name, "kind": c.kind,
                             "ratio": c.ratio if ratio is None else ratio, "own_ratio": c.ratio, "B": B,
                             "ctx": self.sh.ctx if level == "model" else None,
                             **s, "tokens_per_s": B / (s["median_ms"] / 1e3), "bytes": b,
                             "bytes_total": total, "GBps": gbps, "pct_copy": 100 * gbps / self.copy_GBps,
                             "times_ms": [round(t * 1e3, 4) for t in ts],  # every repeat, in run order
                             "cpu_times_ms": [round(t * 1e3, 4) for t in cpu_ts or []]})

    def find(self, level, sweep, name, B=None, ratio=None) -> list[dict]:
        return [r for r in self.records if r["level"] == level and r["sweep"] == sweep and r["name"] == name
                and (B is None or r["B"] == B) and (ratio is None or r["ratio"] == ratio)]


def _decode_step(model: LanguageModel, cache, ctx: int):
    def step(idx_B1):
        model(idx_B1, kv_cache=cache, last_only=True)
        cache.pos = ctx  # rewind: every step attends over ctx cached positions + itself
    return step


def profile_table(call, x, steps: int = 5, rows: int = 15) -> str:
    """torch.profiler table (self CPU time, top ops) of `steps` calls, for the report of a miss."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            call(x)
    key = "self_device_time_total" if x.is_cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


# ----------------------------------------------------------------------------- the run


def run(sh: Shapes, device: str = "auto", dtype: str = "auto", parts=("layer", "model", "generate"),
        peers: bool = True, profile: bool = False, threads: int | None = 2, log=print) -> dict:
    dev = common.pick_device(device)
    dt = common.pick_dtype(dev, dtype)
    prev_threads = torch.get_num_threads()
    if threads and dev.type == "cpu":
        torch.set_num_threads(threads)
    try:
        return _run(sh, dev, dt, parts, peers, profile, log)
    finally:
        torch.set_num_threads(prev_threads)


def _run(sh, dev, dt, parts, peers, profile, log) -> dict:
    sh = replace(sh, ctx=sh.ctx or (2048 if dev.type == "cuda" else 512),
                 max_kv_gb=sh.max_kv_gb or (40.0 if dev.type == "cuda" else 2.5))
    torch.manual_seed(0)
    t0, bench, notes = time.perf_counter(), Bench(sh, dev, dt), {}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if dev.type == "cpu" and torch.get_num_threads() > 1 and load > 0.5:
        notes["load"] = (f"load average {load:.1f} at the start with {torch.get_num_threads()} threads: a "
                         f"parallel region waits whenever another process holds a core, which hits "
                         f"the many-small-op layers hardest; on a shared machine prefer --threads 1")
    bw = common.copy_bandwidth(dev, sh.copy_mb)
    bench.copy_GBps = bw["copy_GBps"]
    log(f"device {dev} {dt}, {torch.get_num_threads()} threads; copy bandwidth {bw['copy_GBps']:.1f} GB/s")
    configs, generation = {}, []
    base = sh.experts / sh.moe_topk
    if "layer" in parts:
        _layer_part(sh, base, dev, dt, bench, configs, notes, peers, profile, log, t0)
    if "model" in parts or "generate" in parts:
        generation += _model_part(sh, base, dev, dt, bench, configs, notes, parts, log, t0)
    if "generate" in parts and sh.gen_presets:
        generation += _tiny_generation(sh, dev, dt, bench)
    rep = {"bench": "decode", "device": _device_name(dev), "dtype": str(dt).replace("torch.", ""),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
           "cpu_count": os.cpu_count(), "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
           "shapes": {k: v for k, v in vars(sh).items()}, "bandwidth": bw, "notes": notes,
           "configs": configs, "records": bench.records, "generation": generation,
           "profiles": bench.profiles, "seconds": time.perf_counter() - t0, "source": _source_digest()}
    rep["targets"] = evaluate_targets(rep)
    return rep


def _layer_part(sh, base, dev, dt, bench, configs, notes, peers, profile, log, t0) -> None:
    """Layer-level groups: every batch size at the base ratio, then the ratio sweep."""
    widths = {k: matched(k, sh, 1.0, experts_at(sh, base))[1] for k in ("ultramem", "pkm")}
    cands = _layer_cands(sh, base, dev, dt, mem_alone=True)
    if peers:
        cands += _peer_cands(sh, cands, dev, dt, experts_at(sh, base), notes)
    configs["layer"] = _describe(cands)
    for B in sh.batches:
        bench.layer_group(cands, B, "batch", profile=profile and B in (8, 64, 256))
        log(_progress(bench, "layer", "batch", B, t0))
    del cands
    anchor = _layer_cands(sh, min(sh.ratios), dev, dt, ("ultramem",), widths=widths, suffix="_anchor")
    for r in sh.ratios:
        group = _layer_cands(sh, r, dev, dt, ("dense", "moe", "ultramem"), widths=widths) + anchor
        configs.setdefault("layer_sweep", {}).update(_describe(group, f"@x{r:g}"))
        bench.layer_group(group, sh.sweep_batch, "ratio", ratio=r)
        log(_progress(bench, "layer", "ratio", sh.sweep_batch, t0, r))
        del group


def _model_part(sh, base, dev, dt, bench, configs, notes, parts, log, t0) -> list:
    """Model-level groups (batch sizes, ratio sweep) and generation speed; returns the latter."""
    generation = []
    elsize = torch.empty((), dtype=dt).element_size()
    kinds = ("dense", "moe", "ultramem", "pkm", "ultramem_v2")
    models = [_model_cand(k, k, _lm_config(k, sh, base), dev, dt, base) for k in kinds]
    configs["model"] = _describe(models)
    if "model" in parts:
        for B in sh.batches:
            kv_gb = kv_cache_bytes(sh.n_layers, B, sh.ctx + 1, sh.dim, elsize) / 1e9
            if kv_gb > sh.max_kv_gb:
                notes[f"model B={B}"] = f"skipped: KV cache {kv_gb:.1f} GB > max_kv_gb {sh.max_kv_gb}"
                continue
            bench.model_group(models, B, "batch")
            log(_progress(bench, "model", "batch", B, t0))
    if "generate" in parts:
        generation += common.generation_speed({c.name: c.module for c in models}, sh.gen_batches,
                                              sh.gen_prompt, sh.gen_new, bench.clock, bench.gen, "bench",
                                              reps=2)
    del models
    if "model" in parts:
        mw = {k: _lm_config(k, sh, base).ffn_hidden for k in ("ultramem",)}
        lo = min(sh.ratios)
        anchor = _model_cand("ultramem_anchor", "ultramem", _lm_config("ultramem", sh, lo, mw), dev, dt, lo)
        for r in sh.ratios:
            group = [_model_cand(k, k, _lm_config(k, sh, r, mw), dev, dt, r)
                     for k in ("dense", "moe", "ultramem")]
            configs.setdefault("model_sweep", {}).update(_describe(group, f"@x{r:g}"))
            bench.model_group(group + [anchor], sh.sweep_batch, "ratio", ratio=r)
            log(_progress(bench, "model", "ratio", sh.sweep_batch, t0, r))
            del group
    return generation


def _describe(cands: list[Cand], suffix: str = "") -> dict:
    return {c.name + suffix: {"kind": c.kind, "ratio": c.ratio, **c.counts, "config": c.config}
            for c in cands}


def _tiny_generation(sh, dev, dt, bench) -> list[dict]:
    try:
        from ..presets import DATA, MODELS
    except ImportError:
        return []
    models = {}
    for kind, fields in MODELS.items():
        torch.manual_seed(0)
        models[kind] = LanguageModel(LMConfig(vocab_size=DATA["vocab_size"], **fields)).to(dev, dt).eval()
    new = min(sh.gen_new * 2, min(m.cfg.max_seq_len for m in models.values()) - sh.gen_prompt)
    return common.generation_speed(models, sh.gen_batches, sh.gen_prompt, new, bench.clock, bench.gen,
                                   "tiny presets")


def _source_digest() -> dict[str, str]:
    """sha1 (12 hex) of the modules whose speed is measured, to tie numbers to a code state."""
    root = Path(__file__).resolve().parent.parent
    return {name: hashlib.sha1((root / name).read_bytes()).hexdigest()[:12]
            for name in ("retrieval.py", "values.py", "layers.py", "ffn.py", "model.py", "attention.py",
                         "v2.py")
            if (root / name).is_file()}


def _device_name(dev) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores)"


def _progress(bench, level, sweep, B, t0, ratio=None) -> str:
    rs = [r for r in bench.records if r["level"] == level and r["sweep"] == sweep and r["B"] == B
          and (ratio is None or r["ratio"] == ratio)]
    cells = "  ".join(f"{r['name']} {r['median_ms']:.2f}" for r in rs)
    where = f"x{ratio:g} " if ratio is not None else ""
    return f"[{time.perf_counter() - t0:6.1f}s] {level} {where}B={B} ms: {cells}"


# ----------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser, generate_only: bool = False) -> None:
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (a smoke run, seconds)")
    p.add_argument("--out", default="bench_out/decode", help="output folder (JSON, markdown, PNGs)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--batches", default=None, help="comma list of batch sizes (default 1,2,4,...,1024)")
    p.add_argument("--ratios", default=None, help="comma list of sparse/dense ratios (default 4,8,16,32,64)")
    p.add_argument("--ctx", type=int, default=None, help="KV cache length (default 2048 GPU, 512 CPU)")
    p.add_argument("--budget", type=float, default=None, help="seconds of timed repeats per group")
    if not generate_only:
        p.add_argument("--parts", default="layer,model,generate", help="comma list: layer,model,generate")
        p.add_argument("--no-peers", action="store_true", help="skip the ultra-mem, PKM and HF peers")
        p.add_argument("--profile", action="store_true", help="torch.profiler tables at layer B=8,64,256")
        p.add_argument("--render", default=None, metavar="JSON",
                       help="measure nothing: rebuild the markdown, targets and plots from a decode.json")


def _ints(text: str | None, name: str):
    if text is None:
        return None
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise ValueError(f"{name}: expected a comma list of positive ints (got {text!r})") from e
    if not vals or min(vals) < 1:
        raise ValueError(f"{name}: expected a comma list of positive ints (got {text!r})")
    return vals


def run_from_args(a: argparse.Namespace) -> int:
    if getattr(a, "render", None):
        rep = json.loads(Path(a.render).read_text())
        rep["targets"] = evaluate_targets(rep)
        paths = write_outputs(rep, a.out)
        print(f"wrote {paths['json']}, {paths['markdown']}, " + ", ".join(map(str, paths["plots"])))
        return 0
    sh = quick_shapes() if a.quick else Shapes()
    over = {"batches": _ints(a.batches, "--batches"), "ratios": _ints(a.ratios, "--ratios"),
            "ctx": a.ctx, "budget_s": a.budget, "model_budget_s": a.budget}
    sh = replace(sh, **{k: v for k, v in over.items() if v is not None})
    parts = tuple(getattr(a, "parts", "generate").split(","))
    bad = sorted(set(parts) - {"layer", "model", "generate"})
    if bad:
        raise ValueError(f"--parts: must be among layer, model, generate (got {bad})")
    rep = run(sh, a.device, a.dtype, parts, peers=not getattr(a, "no_peers", True),
              profile=getattr(a, "profile", False), threads=a.threads)
    rep["quick"] = a.quick
    paths = write_outputs(rep, a.out)
    print(format_markdown(rep))
    print(f"wrote {paths['json']}, {paths['markdown']}, " + ", ".join(map(str, paths["plots"])))
    print(json.dumps(summary_line(rep, paths["json"])))
    return 0


def summary_line(rep: dict, json_path) -> dict:
    """The one JSON line printed last: device, targets and every record's median (the full report,
    with every repeat's time and the byte accounting, is in the JSON file it names)."""
    keep = ("level", "sweep", "name", "kind", "ratio", "B", "ctx", "median_ms", "tokens_per_s", "GBps")
    return {**{k: rep.get(k) for k in ("bench", "device", "dtype", "threads", "quick", "targets")},
            "records": [{k: r.get(k) for k in keep} for r in rep["records"]], "json": str(json_path)}


def register(subparsers) -> None:
    """Add `decode` and `generate-speed` to a (bench) subparsers group; handlers in `handler`."""
    p = subparsers.add_parser("decode", help="decode-step benchmark: layer and model level, sweeps, plots")
    add_arguments(p)
    p.set_defaults(handler=run_from_args)
    g = subparsers.add_parser("generate-speed", help="tokens/s of generate at batch 1 and 32")
    add_arguments(g, generate_only=True)
    g.set_defaults(handler=run_from_args)


def main(argv=None) -> int:
    """Entry point for `ultramem bench decode ARGS` (cli.py runs bench modules' main(argv))."""
    ap = argparse.ArgumentParser(prog="ultramem bench decode", description=__doc__.splitlines()[0])
    add_arguments(ap)
    return run_from_args(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
