"""Sharded value tables on this machine (gloo, CPU): step time, bytes sent, memory per rank.

Run: ultramem bench dist [--quick] [--tokens 256] [--worlds 1 2 4] [--json-out PATH]

For each layout ("dim", "row") and world size P it starts `torchrun --nproc_per_node P` on this
module (worker mode); every rank builds the same UltraMem layer (D=128, N=64^2 rows, D_v=128,
E=4, H=2, m=16, h=2), shards its table with `parallelize_memory`, and times training steps
(forward, backward, AdamW step, Tucker refresh) on its own `--tokens` random tokens. Reported:

- step_ms: median wall time of a step on rank 0 (warm-up first; noisy on a shared machine);
- sent_kb: bytes this rank sent to other ranks in one step, counted by `ultramem.distributed.comm`
  from the tensors handed to the collectives (mean over ranks), beside model_kb, the cost
  model's prediction (`ultramem.distributed.cost.comm_bytes`) for the same shapes;
- value_mb: the rank's value weights + AdamW state (exp_avg, exp_avg_sq), and its ratio to 1/P of
  the single-process figure.
The last line printed is one JSON object with every row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WIDTH = 128


def _layer():
    import torch

    from ultramem import UltraMemConfig, UltraMemLayer

    torch.manual_seed(0)
    return UltraMemLayer(UltraMemConfig(dim=WIDTH, num_keys=64, key_dim=32, value_dim=128, heads=2, topk=16,
                                        value_expansion=4))


def _value_bytes(layer, opt) -> int:
    w = layer.values.weight
    local = w.to_local() if hasattr(w, "to_local") else w
    state = opt.state.get(w, {})
    extra = sum((t.to_local() if hasattr(t, "to_local") else t).numel() * 4
                for k, t in state.items() if k in ("exp_avg", "exp_avg_sq"))
    return local.numel() * local.element_size() + extra


def worker(layout: str, tokens: int, steps: int) -> None:
    import torch
    import torch.distributed as dist

    from ultramem.distributed import (
        bytes_sent,
        comm_bytes,
        init_distributed,
        init_mesh,
        parallelize_memory,
        reset_bytes_sent,
    )

    torch.set_num_threads(1)
    init_distributed("gloo")
    P, rank = dist.get_world_size(), dist.get_rank()
    layer = _layer()
    full_bytes = 3 * layer.values.weight.numel() * 4
    parallelize_memory(layer, init_mesh(mp=P), layout=layout)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    torch.manual_seed(1 + rank)
    x = torch.randn(1, tokens, WIDTH)
    times, sent = [], []
    for i in range(steps + 2):
        dist.barrier()
        reset_bytes_sent()
        t0 = time.perf_counter()
        layer(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        layer.after_optimizer_step()
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - t0)
            sent.append(bytes_sent())
    mean_sent = torch.tensor([float(statistics.mean(sent))])
    dist.all_reduce(mean_sent)
    t = layer.values
    model = comm_bytes(layout, tokens, layer.rows_per_token, 4, t.num_chunks, t.dim, P)
    mem = _value_bytes(layer, opt)
    if rank == 0:
        print("ROW " + json.dumps({"layout": layout, "world": P, "tokens": tokens,
                                   "step_ms": 1e3 * statistics.median(times),
                                   "sent_kb": mean_sent.item() / P / 1024, "model_kb": model / 1024,
                                   "value_mb": mem / 2**20, "value_vs_1_over_P": mem * P / full_bytes}),
              flush=True)
    dist.destroy_process_group()


def _launch(layout: str, world: int, tokens: int, steps: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           "-m", "ultramem.bench.dist_bench", "--worker", layout, "--tokens", str(tokens),
           "--steps", str(steps)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    if proc.returncode or not rows:
        raise RuntimeError(f"dist bench {layout} world {world} failed:\n{proc.stderr[-3000:]}")
    return rows[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ultramem bench dist", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 timed steps, worlds 1 and 2")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per rank per step")
    ap.add_argument("--steps", type=int, default=8, help="timed steps (after 2 warm-up)")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--json-out")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.worker, a.tokens, a.steps)
        sys.stdout.flush()
        os._exit(0)  # skip teardown: gloo's threads sometimes abort there after a clean run
    worlds, steps = ([1, 2], 3) if a.quick else (a.worlds, a.steps)
    rows = [_launch(lay, w, a.tokens, steps) for w in worlds for lay in ("dim", "row")]
    print(f"{'layout':6} {'P':>2} {'step ms':>8} {'sent KB':>9} {'model KB':>9} {'sent/model':>10} "
          f"{'value MB':>9} {'x 1/P':>6}")
    for r in rows:
        ratio = r["sent_kb"] / r["model_kb"] if r["model_kb"] else float("nan")
        print(f"{r['layout']:6} {r['world']:>2} {r['step_ms']:8.1f} {r['sent_kb']:9.1f} {r['model_kb']:9.1f} "
              f"{ratio:10.3f} {r['value_mb']:9.2f} {r['value_vs_1_over_P']:6.3f}")
    result = {"bench": "dist", "tokens_per_rank": a.tokens, "rows": rows}
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(result, f)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
