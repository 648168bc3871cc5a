"""`torchrun ... ultramem train --set dist.mp=P`: data-parallel training with sharded value tables.

The single-process trainer (`ultramem.train`) is not touched; the CLI sends a run here when it
has a `dist` section or runs under torchrun (WORLD_SIZE > 1). It reuses the trainer's pieces
(config, data, model, optimiser, schedule, metrics log) and adds, per step:

- every rank reads its own data: rank r trains on rows [r b, (r+1) b) (b = batch_size / world) of
  the single-process run's batch of that step (a pure function of (seed, step)), so a sharded run
  follows the single-process run up to floating-point summation order;
- value tables are sharded over `mp` (`parallelize_memory`); their shard gradients (summed over
  the mp group's tokens by the tables' backward) are summed over `dp` and divided by the world
  size, so every parameter sees the gradient of the mean loss over the global batch;
- the other parameters: DDP over all ranks (`dist.dense=ddp`, the value tables ignored), or FSDP2
  `fully_shard` over all ranks (`dist.dense=fsdp`, the tables passed as ignored_params);
- logged losses are averaged over ranks; only rank 0 prints, writes metrics and config;
- checkpoints are DCP directories (`checkpoint.dcp` in the run folder, atomic; see checkpoint.py).

Shape legend: B batch, T time.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from ..checkpoint import atomic_write_text
from ..confbase import ConfigBase, param
from ..data import TrainBatchSampler, prepare_data
from ..model import LanguageModel
from ..optim import build_optimizer
from ..runs import MetricsLog, open_run_dir
from ..train import RunConfig, autocast_for, evaluate, model_config_for, seed_everything
from .checkpoint import is_dcp, load_dcp, resolve_dcp, save_dcp
from .mesh import device_type, dp_group, init_distributed, init_mesh
from .parallel import parallelize_memory

CKPT_DIR = "checkpoint.dcp"


@dataclass
class DistConfig(ConfigBase):
    section = "dist."

    mp: int = param(0, "ranks a value table is sharded over (0: all of them); dp = world / mp", ge=0)
    layout: Literal["auto", "dim", "row"] = param("auto", "table sharding (auto: the SPEC 8 cost model)")
    dense: Literal["ddp", "fsdp"] = param("ddp", "the other parameters: DDP, or FSDP2 fully_shard")


@dataclass
class _Run:
    cfg: RunConfig
    dc: DistConfig
    out: Path
    model: LanguageModel
    step_fn: object  # the module a forward goes through (DDP wrapper or the model)
    opt: object
    sampler: TrainBatchSampler
    data: object
    mcfg: object
    amp: object
    rank: int
    world: int
    mesh: object
    step: int = 0


def _setup(cfg: RunConfig, dc: DistConfig, log) -> _Run:
    tc = cfg.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    mp = dc.mp or world
    if world % mp:
        raise ValueError(f"dist.mp: must divide the world size {world} (got {mp})")
    if tc.batch_size % world:
        raise ValueError(f"train.batch_size: must be divisible by the world size {world} "
                         f"(got {tc.batch_size})")
    mesh = init_mesh(dp=world // mp, mp=mp)
    rank = dist.get_rank()
    device = torch.device(device_type(), torch.cuda.current_device()) if device_type() == "cuda" else \
        torch.device("cpu")
    if rank == 0:
        data = prepare_data(cfg.data, tc.cache_dir, log=log)
    dist.barrier()  # the others read rank 0's cache
    if rank:
        data = prepare_data(cfg.data, tc.cache_dir, log=lambda *a: None)
    mcfg = model_config_for(cfg.model, data.vocab_size, tc.seq_len)
    seed_everything(tc.seed)  # identical init, IVE permutation and draws on every rank
    model = LanguageModel(mcfg).to(device)
    parallelize_memory(model, mesh, layout=dc.layout, tokens_per_step=tc.batch_size // world * tc.seq_len)
    step_fn = _wrap_dense(model, dc.dense, world)
    opt = build_optimizer(model, lr=tc.lr, weight_decay=tc.weight_decay, value_lr_mult=tc.value_lr_mult,
                          betas=(tc.beta1, tc.beta2), eps=tc.eps, total_steps=tc.steps,
                          warmup_steps=tc.warmup_steps, min_lr_ratio=tc.min_lr_ratio,
                          value_lr_decay_frac=tc.value_lr_decay_frac)
    sampler = TrainBatchSampler(data.train, tc.batch_size, tc.seq_len, seed=tc.seed, device=device)
    return _Run(cfg=cfg, dc=dc, out=Path(tc.out_dir), model=model, step_fn=step_fn, opt=opt, sampler=sampler,
                data=data, mcfg=mcfg, amp=autocast_for(tc.dtype, device), rank=rank, world=world, mesh=mesh)


def _wrap_dense(model: LanguageModel, dense: str, world: int):
    """DDP or FSDP2 over all ranks for everything but the value tables; returns what to call."""
    values = set(model.value_parameters())
    if dense == "fsdp":
        from torch.distributed.fsdp import fully_shard

        flat = init_device_mesh(device_type(), (world,), mesh_dim_names=("world",))
        fully_shard(model, mesh=flat, ignored_params=values)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    names = [n for n, p in model.named_parameters() if p in values]
    DDP._set_params_and_buffers_to_ignore_for_model(model, names)
    return DDP(model, broadcast_buffers=False)


def _reduce_value_grads(r: _Run) -> None:
    """Shard grads hold the mp group's tokens: add the other dp groups', then make it a mean."""
    group = dp_group(r.mesh)
    for p in {id(p): p for p in r.model.value_parameters()}.values():  # a shared pool once
        if p.grad is None:
            continue
        g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        if group is not None:
            dist.all_reduce(g, group=group)
        g.div_(r.world)


def _clip(params, max_norm: float | None) -> torch.Tensor:
    """Global grad norm over plain and DTensor grads (each DTensor's norm is a collective)."""
    sq = []
    for p in params:
        if p.grad is None:
            continue
        n = p.grad.float().norm()
        sq.append((n.full_tensor() if isinstance(n, DTensor) else n).square())
    total = torch.stack(sq).sum().sqrt()
    if max_norm:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef.item())
    return total


def _after_step(r: _Run) -> None:
    """Tucker refresh; under FSDP2 on the full (unsharded) cores."""
    if r.dc.dense == "fsdp":
        r.model.unshard()
        r.model.after_optimizer_step()
        r.model.reshard()
    else:
        r.model.after_optimizer_step()


def _train_step(r: _Run) -> torch.Tensor:
    r.opt.set_step(r.step)
    x, y = r.sampler.batch(r.step)  # the single-process global batch; this rank's rows of it
    b = x.shape[0] // r.world
    x, y = x[r.rank * b:(r.rank + 1) * b], y[r.rank * b:(r.rank + 1) * b]
    with r.amp:
        _, ce = r.step_fn(x, y)
        aux = r.model.aux_losses()
        loss = ce + sum(aux.values(), ce.new_zeros(()))
    loss.backward()
    _reduce_value_grads(r)
    gnorm = _clip(r.opt.params(), r.cfg.train.grad_clip or None)
    r.opt.step()
    r.opt.zero_grad(set_to_none=True)
    _after_step(r)
    r.step += 1
    return torch.stack([loss.detach().float(), ce.detach().float(), gnorm.detach().float()])


def _mean_over_ranks(vals: torch.Tensor, world: int) -> torch.Tensor:
    vals = vals.clone()
    dist.all_reduce(vals)
    return vals / world


def _checkpoint(r: _Run, tokens: int) -> None:
    save_dcp(r.out / CKPT_DIR, r.model, r.opt.optimizers, step=r.step, model_config=r.mcfg.to_dict(),
             extra={"tokens": tokens, "world": r.world, "mp": r.mesh.size(r.mesh.ndim - 1)})


def _resume(r: _Run, log) -> int | None:
    """Load the run folder's DCP checkpoint when asked to (train.resume); the tokens seen, or None
    when starting afresh."""
    tc = r.cfg.train
    path = r.out / CKPT_DIR
    found = is_dcp(path) or is_dcp(path.parent / f".{CKPT_DIR}.old")
    if tc.resume is True and not found:
        raise ValueError(f"train.resume: '{r.out}' has no {CKPT_DIR} to resume from (got True)")
    if not (found and tc.resume):
        return None
    meta = load_dcp(resolve_dcp(path), r.model, r.opt.optimizers)
    r.step = meta["step"]
    _after_step(r)
    log(f"resumed from {path} at step {r.step}")
    return int(meta.get("extra", {}).get("tokens", 0))


def _loop(r: _Run, log) -> dict:
    tc = r.cfg.train
    tokens = _resume(r, log)
    metrics = MetricsLog(r.out / "metrics.jsonl", None if tokens is None else r.step) if r.rank == 0 else None
    tokens = tokens or 0
    pending, losses, t0 = [], [], time.perf_counter()
    end = min(tc.steps, tc.stop_after) if tc.stop_after else tc.steps
    r.model.train()
    while r.step < end:
        pending.append(_train_step(r))
        if r.step % tc.log_every == 0 or r.step == end or (tc.ckpt_every and r.step % tc.ckpt_every == 0):
            vals = _mean_over_ranks(torch.stack(pending), r.world).cpu()
            tokens += tc.batch_size * tc.seq_len * len(pending)
            first = r.step - len(pending) + 1
            losses += [(first + i, v) for i, v in enumerate(vals[:, 0].tolist())]
            if metrics is not None:
                mean = vals.mean(0).tolist()
                metrics.write(kind="train", step=r.step, loss=mean[0], ce=mean[1], grad_norm=mean[2],
                              losses=vals[:, 0].tolist(), lr=r.opt.lrs().get("decay", tc.lr), tokens=tokens,
                              tokens_per_s=tokens / max(time.perf_counter() - t0, 1e-9))
                log(f"step {r.step}: loss {mean[0]:.4f}")
            pending = []
        if (tc.ckpt_every and r.step % tc.ckpt_every == 0) or r.step == end:
            _checkpoint(r, tokens)
    last = {}
    if r.step >= tc.steps and tc.eval_every >= 0:
        last = evaluate(r.model, r.data, tc.replace(memory_diagnostics=False), r.amp)
        if metrics is not None:
            metrics.write(kind="eval", step=r.step, **last)
    return {"step": r.step, "out_dir": str(r.out), "losses": losses,
            "train_loss": losses[-1][1] if losses else None, **last, "world": r.world}


def train_distributed(cfg: RunConfig, dc: DistConfig, log=print) -> dict:
    """Train (or resume) a run under torchrun; every rank calls it. Returns the summary on all ranks."""
    init_distributed()
    rank = dist.get_rank()
    say = log if rank == 0 else (lambda *a, **k: None)
    try:
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        r = _setup(cfg, dc, say)
        if rank == 0:
            open_run_dir(r.out)
            atomic_write_text(r.out / "config.json", json.dumps({**cfg.to_dict(), "dist": dc.to_dict()},
                                                                indent=1))
        dist.barrier()
        return _loop(r, say)
    finally:
        dist.destroy_process_group()
