"""Training throughput of matched models: tokens/s of one full optimiser step (forward, backward,
clip, AdamW step, refresh_tucker), interleaved across models so a busy spell hits all alike.

    python -m ultramem.bench.train_bench [--models tiny|main] [--threads 2] [--budget 20] [--dtype fp32 bf16]
    ultramem bench train ...

`tiny` = the tiny presets (ultramem.presets.MODELS, d=64, UltraMemV2 included); `main` = the
experiment suite's matched models (d=128, experiments/suites.py). Prints a table and one JSON
line last; target (issue 3): UltraMem at least 0.6x the dense model's tokens/s at equal activated
params. With `--dtype fp32 bf16` every model is also timed under CPU bf16 autocast (rows
"<model>/bf16", ratio against its fp32 row): the measurement behind the experiments' choice of fp32.
"""

from __future__ import annotations

import argparse
import json

import torch

from ..counting import count_params
from ..cpu_memory import keep_freed_memory
from ..model import LanguageModel, LMConfig
from ..optim import build_optimizer, clip_grad_norm
from .common import Clock, markdown_table, spread, time_interleaved

TARGET_RATIO = 0.6


def model_sets(name: str) -> tuple[dict[str, dict], int, int, int]:
    """(model dicts, vocab, batch, seq) of a named set."""
    if name == "tiny":
        from ..presets import DATA, MODELS, TRAIN

        return MODELS, DATA["vocab_size"], TRAIN["batch_size"], TRAIN["seq_len"]
    if name == "main":
        from ..experiments.suites import MATCHED, SEQ, TRAIN, VOCAB

        return MATCHED, VOCAB, TRAIN["batch_size"], SEQ
    raise ValueError(f"--models: must be 'tiny' or 'main' (got {name!r})")


def make_step(model: LanguageModel, vocab: int, dtype: str = "fp32"):
    from ..train import autocast_for

    opt = build_optimizer(model, lr=1e-3, total_steps=10_000, warmup_steps=0)
    amp = autocast_for(dtype, torch.device("cpu"))

    def step(batch):
        x, y = batch
        with amp:
            _, loss = model(x, y)
        loss = loss + sum(model.aux_losses().values(), loss.new_zeros(()))
        loss.backward()
        clip_grad_norm(opt.params(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.after_optimizer_step()

    return step


def run(models: str = "tiny", threads: int = 2, budget: float = 20.0, reps: int = 30,
        dtypes: tuple[str, ...] = ("fp32",), keep_freed: bool = True) -> dict:
    for dt in dtypes:
        if dt not in ("fp32", "bf16"):
            raise ValueError(f"--dtype: each must be 'fp32' or 'bf16' (got {dt!r})")
    torch.set_num_threads(threads)
    # As the trainer does on CPU (train.cpu_keep_freed): process-wide, so a comparison of the two
    # takes two processes (--no-keep-freed).
    kept = keep_freed_memory() if keep_freed else False
    dicts, vocab, batch, seq = model_sets(models)
    steps, counts = {}, {}
    for kind, d in dicts.items():
        for dt in dtypes:
            name = kind if dt == dtypes[0] else f"{kind}/{dt}"
            torch.manual_seed(0)
            m = LanguageModel(LMConfig.from_dict({**d, "vocab_size": vocab, "max_seq_len": seq}))
            m.train()
            steps[name], counts[name] = make_step(m, vocab, dt), count_params(m, seq)
    gen = torch.Generator().manual_seed(1)
    inputs = [(torch.randint(0, vocab, (batch, seq), generator=gen),
               torch.randint(0, vocab, (batch, seq), generator=gen)) for _ in range(reps)]
    times = time_interleaved(steps, inputs, Clock(torch.device("cpu")), warmup=2, min_reps=5,
                             budget_s=budget)
    tokens = batch * seq
    rows, result = [], {"models": models, "threads": threads, "batch": batch, "seq": seq,
                        "dtypes": list(dtypes), "keep_freed": kept, "runs": {}}
    dense_tps = tokens / (spread(times["dense"])["median_ms"] / 1e3) if "dense" in times else None
    for kind, ts in times.items():
        s = spread(ts)
        tps = tokens / (s["median_ms"] / 1e3)
        ratio = tps / dense_tps if dense_tps else None
        base = kind.split("/")[0]
        vs_fp32 = (spread(times[base])["median_ms"] / s["median_ms"]) if base != kind else None
        result["runs"][kind] = {**s, "tokens_per_s": tps, "vs_dense": ratio, "vs_first_dtype": vs_fp32,
                                "total": counts[kind]["total"], "activated": counts[kind]["activated"]}
        rows.append([kind, f"{counts[kind]['total']:,}", f"{counts[kind]['activated']:,}",
                     f"{s['median_ms']:.1f}", f"{s['p25_ms']:.1f}-{s['p75_ms']:.1f}", f"{tps:,.0f}",
                     "-" if ratio is None else f"{ratio:.2f}x",
                     "-" if vs_fp32 is None else f"{vs_fp32:.2f}x"])
    um = result["runs"].get("ultramem", {}).get("vs_dense")
    result["target"] = {"ultramem_vs_dense": um, "target": TARGET_RATIO,
                        "met": None if um is None else um >= TARGET_RATIO}
    print(markdown_table(["model", "total", "activated", "step ms", "p25-p75", "tokens/s", "vs dense",
                          f"vs {dtypes[0]}"], rows))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ultramem bench train", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny", help="tiny (compare presets) or main (experiment models)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=20.0, help="seconds of timed repeats")
    p.add_argument("--dtype", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                   help="precisions to time (first = the reference of the last column)")
    p.add_argument("--no-keep-freed", action="store_true",
                   help="leave glibc malloc as it is (the trainer's train.cpu_keep_freed=false)")
    a = p.parse_args(argv)
    result = run(a.models, a.threads, a.budget, dtypes=tuple(a.dtype), keep_freed=not a.no_keep_freed)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
