"""Shared benchmark helpers: device-aware interleaved timing, robust statistics, copy bandwidth,
markdown tables and matplotlib (Agg, no display) line plots.

Timing rules used by every caller:
- CPU: wall clock (time.perf_counter) around one call; GPU: a pair of CUDA events around one
  call, synchronised after it, so queued work is not mistaken for a fast call;
- candidates are interleaved: repeat r runs every candidate once, in an order rotated by r, so a
  slow spell of a shared machine hits all of them alike; each repeat feeds a fresh input (the
  same one to every candidate), so branchy code such as top-k cannot learn one input by heart;
- results are medians with their spread (p25, p75, min, max), never means.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"--device: must be 'auto', 'cpu' or 'cuda[:i]' (got {name!r})")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device: {name!r} requested but torch.cuda.is_available() is False")
    return torch.device(name)


def pick_dtype(device: torch.device, name: str) -> torch.dtype:
    """'auto' = bf16 on a GPU (the decode setting that matters there), fp32 on CPU."""
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in table:
        raise ValueError(f"--dtype: must be one of {['auto', *table]} (got {name!r})")
    return table[name]


class Clock:
    """Seconds taken by one call of fn(): perf_counter on CPU, CUDA events on a GPU.

    On CPU the calling thread's CPU time of the call is kept in `last_cpu` too. With one torch
    thread that is all the work of the call, minus the time the OS gave the core to other
    processes: on a shared machine it is the steadier estimate of the unloaded wall time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.last_cpu: float | None = None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        t1, c1 = time.perf_counter(), time.thread_time()
        self.last_cpu = c1 - c0
        return t1 - t0


def time_interleaved(fns: dict[str, Callable[[object], object]], inputs: Sequence, clock: Clock,
                     warmup: int = 2, min_reps: int = 3, max_reps: int | None = None,
                     budget_s: float | None = None, cpu_out: dict | None = None) -> dict[str, list[float]]:
    """Seconds per call of each fns[name](x) over the repeats (cpu_out, if given, gets the thread
    CPU seconds of the same calls on CPU).

    `warmup` untimed calls per candidate on inputs[0] come first; the last warm-up round is timed
    to size the run: reps = clamp(budget_s / (seconds of one round), min_reps, max_reps) (default
    max_reps: len(inputs)). Repeat r takes inputs[r % len(inputs)]. Spreading the repeats of a
    short group over the whole budget keeps one busy spell of a shared machine from owning its
    median.
    """
    names = list(fns)
    round_s = 0.0
    for _ in range(max(warmup, 1)):
        round_s = 0.0
        for n in names:
            round_s += clock(lambda n=n: fns[n](inputs[0]))
    reps = len(inputs) if max_reps is None else max_reps
    if budget_s is not None:
        reps = min(reps, max(min_reps, int(budget_s / max(round_s, 1e-9))))
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        x = inputs[r % len(inputs)]
        for i in range(len(names)):
            n = names[(i + r) % len(names)]
            times[n].append(clock(lambda n=n, x=x: fns[n](x)))
            if cpu_out is not None and clock.last_cpu is not None:
                cpu_out.setdefault(n, []).append(clock.last_cpu)
    return times


def quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def spread(ts: Sequence[float]) -> dict[str, float]:
    """Median and spread of a list of seconds, in milliseconds."""
    return {"median_ms": quantile(ts, 0.5) * 1e3, "p25_ms": quantile(ts, 0.25) * 1e3,
            "p75_ms": quantile(ts, 0.75) * 1e3, "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3,
            "reps": len(ts)}


def cpu_copy_bandwidth(megabytes: int) -> dict:
    """(read + written) bytes per second of a large copy into a preallocated buffer, and the read
    rate of a sum over it (page faults of a fresh allocation are kept out of both)."""
    src = torch.randn(megabytes * 2 ** 20 // 4)
    dst = torch.empty_like(src)
    nbytes = src.numel() * 4
    best_copy = best_sum = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        t1 = time.perf_counter()
        src.sum()
        t2 = time.perf_counter()
        best_copy, best_sum = min(best_copy, t1 - t0), min(best_sum, t2 - t1)
    return {"copy_GBps": 2 * nbytes / best_copy / 1e9, "read_GBps": nbytes / best_sum / 1e9,
            "buffer_MB": megabytes}


def copy_bandwidth(device: torch.device, megabytes: int = 512) -> dict:
    """(read + written) bytes/s of dst.copy_(src) over a buffer far beyond the caches.

    CPU: the layer benchmark's measurement (also a read-only rate from a sum); GPU: the same copy
    timed with CUDA events."""
    if device.type == "cpu":
        return cpu_copy_bandwidth(megabytes)
    src = torch.randn(megabytes * 2 ** 20 // 4, device=device)
    dst = torch.empty_like(src)
    clock, nbytes = Clock(device), src.numel() * 4
    best_copy = min(clock(lambda: dst.copy_(src)) for _ in range(10))
    best_sum = min(clock(lambda: src.sum()) for _ in range(10))
    return {"copy_GBps": 2 * nbytes / best_copy / 1e9, "read_GBps": nbytes / best_sum / 1e9,
            "buffer_MB": megabytes}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence], align: str | None = None) -> str:
    """A GitHub markdown table; align is one char per column ('l' or 'r'), default right but first."""
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(map(str, headers)) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_num(x: float | None, digits: int = 3) -> str:
    """Compact number: 3 significant digits, thousands grouped; '-' for None/NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def line_plots(path, panels: Sequence[dict], title: str | None = None) -> None:
    """One PNG of side-by-side panels. Each panel: {"title", "xlabel", "ylabel", "series":
    {label: (xs, ys)}, optional "logx", "logy", "hlines": {label: y}, "dashed": labels}."""
    fig = Figure(figsize=(6.2 * len(panels), 4.6), dpi=110)
    FigureCanvasAgg(fig)
    for i, p in enumerate(panels, 1):
        ax = fig.add_subplot(1, len(panels), i)
        for label, (xs, ys) in p["series"].items():
            pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
            if pts:
                ls = "--" if label in p.get("dashed", ()) else "-"
                ax.plot([x for x, _ in pts], [y for _, y in pts], ls=ls, marker="o", ms=3.5, label=label)
        for label, y in p.get("hlines", {}).items():
            ax.axhline(y, ls="--", lw=1, color="gray", label=label)
        if p.get("logx"):
            ax.set_xscale("log", base=2)
        if p.get("logy"):
            ax.set_yscale("log")
        ax.set_title(p.get("title", ""), fontsize=10)
        ax.set_xlabel(p.get("xlabel", ""))
        ax.set_ylabel(p.get("ylabel", ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def generation_speed(models: dict, batches: Sequence[int], prompt_len: int, new_tokens: int, clock: Clock,
                     gen: torch.Generator, label: str, reps: int = 3) -> list[dict]:
    """tokens/s of greedy `LanguageModel.generate` (KV cache) per model and batch, interleaved.

    Every model gets the same random prompts; tokens/s counts new tokens only (batch * new_tokens
    over the whole call, prompt prefill included in the time)."""
    out = []
    first = next(iter(models.values()))
    device, vocab = next(first.parameters()).device, first.cfg.vocab_size
    for B in batches:
        prompts = [torch.randint(0, vocab, (B, prompt_len), generator=gen).to(device) for _ in range(reps)]
        fns = {n: (lambda p, m=m: m.generate(p, new_tokens, temperature=0.0)) for n, m in models.items()}
        with torch.inference_mode():
            times = time_interleaved(fns, prompts, clock, warmup=1, min_reps=reps, max_reps=reps)
        for n, ts in times.items():
            s = spread(ts)
            out.append({"models": label, "name": n, "B": B, "new_tokens": new_tokens, "prompt": prompt_len,
                        **s, "tokens_per_s": B * new_tokens / (s["median_ms"] / 1e3)})
    return out


def pkm_peer_rows_read(peer, x: torch.Tensor) -> int:
    """Distinct value rows a `product-key-memory` layer reads for x (its values embedding's input)."""
    seen = []
    hook = peer.values.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0]))
    try:
        peer(x)
    finally:
        hook.remove()
    return int(torch.unique(seen[0]).numel())
