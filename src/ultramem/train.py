"""Training loop: config, optimiser schedule, evaluation, metrics log, checkpoints, exact resume.

A run is described by RunConfig = {model: LMConfig fields, data: DataConfig fields, train:
TrainConfig fields} and lives in train.out_dir:

    config.json             the resolved run config (vocab_size and max_seq_len filled in)
    tokenizer.json          a copy of the data's tokenizer, so generate needs no data cache
    metrics.jsonl           one JSON object a line: kind "params", "train" or "eval"
    checkpoint.safetensors  latest checkpoint (model, optimiser, RNG, sampler position)

Exact resume: the batch of step n is a pure function of (seed, n), the lr a function of n, and
the checkpoint holds weights, optimiser moments and RNG states as of the end of a step, after
refresh_tucker; evaluation runs inside fork_rng and draws no random numbers. So resuming at step
k replays steps k+1.. bit for bit (same device, dtype and thread count).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import (
    CHECKPOINT_NAME,
    atomic_write_text,
    config_diff,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from .counting import count_params, format_counts
from .data import DataConfig, TrainBatchSampler, ValBatches, fact_recall_accuracy, prepare_data
from .diagnostics import MemoryProbe
from .model import LanguageModel, LMConfig
from .optim import build_optimizer, clip_grad_norm

DTYPES = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig:
    out_dir: str = "runs/run"
    cache_dir: str = "cache/data"  # prepared (tokenised) data is cached here, shared by runs
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine ends at lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    value_lr_mult: float = 4.0  # M of SPEC section 4
    value_lr_decay_frac: float = 0.25  # S = frac * steps
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100  # 0: evaluate only at the end
    eval_windows: int = 64  # val windows of seq_len tokens per evaluation
    fact_queries: int = 200  # fact-recall queries per evaluation (facts data only); 0 disables
    fact_max_new_tokens: int = 8
    ckpt_every: int = 0  # 0: checkpoint only at the end
    resume: bool = False  # continue from out_dir/checkpoint.safetensors when it exists
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps; resume later
    progress: bool = True  # tqdm bar
    memory_diagnostics: bool = True  # at eval: retrieval recall, value rows read (val and training)

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "log_every", "eval_windows", "fact_max_new_tokens"):
            _check(name, getattr(self, name), lambda v: _is_int(v) and v >= 1, "must be an int >= 1")
        for name in ("warmup_steps", "eval_every", "ckpt_every", "threads", "fact_queries", "seed"):
            _check(name, getattr(self, name), lambda v: _is_int(v) and v >= 0, "must be an int >= 0")
        _check("warmup_steps", self.warmup_steps, lambda v: v <= self.steps, f"must be <= steps={self.steps}")
        _check("lr", self.lr, lambda v: _is_num(v) and v > 0, "must be a number > 0")
        for name in ("weight_decay", "grad_clip", "eps", "value_lr_decay_frac"):
            _check(name, getattr(self, name), lambda v: _is_num(v) and v >= 0, "must be a number >= 0")
        for name in ("beta1", "beta2", "min_lr_ratio"):
            _check(name, getattr(self, name), lambda v: _is_num(v) and 0 <= v <= 1, "must be in [0, 1]")
        _check("value_lr_mult", self.value_lr_mult, lambda v: _is_num(v) and v > 0, "must be a number > 0")
        _check("dtype", self.dtype, lambda v: v in DTYPES, f"must be one of {list(DTYPES)}")
        _check("device", self.device, lambda v: v in DEVICES, f"must be one of {list(DEVICES)}")
        if self.stop_after is not None:
            _check("stop_after", self.stop_after, lambda v: _is_int(v) and v >= 1,
                   "must be None or an int >= 1")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(name, value, ok, rule) -> None:
    if not ok(value):
        raise ValueError(f"train.{name}: {rule} (got {value!r})")


def _from_dict(cls, d: dict, section: str):
    if not isinstance(d, dict):
        raise ValueError(f"{section}: must be a table of keys (got {type(d).__name__})")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{section}: unknown key(s) {unknown}; allowed keys are {sorted(names)}")
    return cls(**d)


@dataclass
class RunConfig:
    model: dict = field(default_factory=dict)  # LMConfig fields (vocab_size comes from the data)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        unknown = sorted(set(d) - {"model", "data", "train"})
        if unknown:
            raise ValueError(f"config: unknown section(s) {unknown}; allowed sections are "
                             "['data', 'model', 'train']")
        model = dict(d.get("model", {}))
        LMConfig.from_dict({**model, "vocab_size": max(int(model.get("vocab_size", 256)), 1)})  # validate now
        return cls(model=model, data=DataConfig.from_dict(dict(d.get("data", {}))),
                   train=_from_dict(TrainConfig, dict(d.get("train", {})), "train"))

    def to_dict(self) -> dict:
        return {"model": dict(self.model), "data": dataclasses.asdict(self.data),
                "train": dataclasses.asdict(self.train)}


# ---------------------------------------------------------------- helpers

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: 'cuda' requested but no CUDA device is available (got 'cuda')")
    return torch.device(name)


def autocast_for(dtype: str, device: torch.device):
    """bf16 autocast context (or a no-op for fp32); 'auto' = bf16 on CUDA only."""
    use_bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_config_for(model: dict, vocab_size: int, seq_len: int) -> LMConfig:
    """LMConfig with the tokenizer's vocab size and room for seq_len positions."""
    d = dict(model)
    d["vocab_size"] = vocab_size
    d["max_seq_len"] = max(int(d.get("max_seq_len", 0) or 0), seq_len)
    return LMConfig.from_dict(d)


class MetricsLog:
    """Append-only JSONL; on resume, records after the checkpoint's step are dropped first."""

    def __init__(self, path: Path, keep_until_step: int | None):
        self.path = path
        if keep_until_step is None or not path.exists():
            path.write_text("")
        else:
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= keep_until_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write(self, **record) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path) -> list[dict]:
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def fact_recall(model, data, queries, max_new_tokens: int, amp, batch_size: int = 64) -> dict:
    """Greedy-decode the answer of each query; accuracy overall, on seen and held-out templates."""
    device = next(model.parameters()).device
    prompts = [data.encode_prompt(q.prompt) for q in queries]
    by_len = defaultdict(list)  # generate takes equal-length prompts, so batch by length
    for i, p in enumerate(prompts):
        by_len[len(p)].append(i)
    preds = [""] * len(queries)
    for n, idxs in by_len.items():
        for s in range(0, len(idxs), batch_size):
            chunk = idxs[s:s + batch_size]
            x = torch.tensor([prompts[i] for i in chunk], dtype=torch.long, device=device)
            with amp:
                out = model.generate(x, max_new_tokens, temperature=0.0, eos_id=data.eos_id)
            for row, i in enumerate(chunk):
                preds[i] = data.tokenizer.decode(out[row, n:].tolist(), skip_special_tokens=False)
    res = {"fact_acc": fact_recall_accuracy(preds, [q.answer for q in queries])}
    for key, want in (("fact_acc_seen", False), ("fact_acc_heldout", True)):
        sel = [i for i, q in enumerate(queries) if q.heldout == want]
        if sel:
            res[key] = fact_recall_accuracy([preds[i] for i in sel], [queries[i].answer for i in sel])
    return res


@torch.no_grad()
def training_reads(model) -> dict:
    """Per memory layer, from the training batches since the last call (see ValueTable.count_reads):
    the share of value rows read at least once and the share of reads that went to the most-read
    10% of rows (0.1 = uniform use; near 1 = a few rows take everything)."""
    out = {}
    for i, layer in enumerate(model.memory_layers()):
        if layer.values.read_counts is None:
            continue
        counts = layer.values.take_read_counts()
        total = counts.sum().item()
        if total == 0:
            continue
        top = counts.topk(max(1, counts.numel() // 10)).values.sum().item()
        out[f"mem{i}_rows_read_train"] = (counts > 0).float().mean().item()
        out[f"mem{i}_top10pct_reads"] = top / total
    return out


def evaluate(model, data, tc: TrainConfig, amp) -> dict:
    """Val loss on fixed windows (+ fact recall on facts data); leaves RNG and train mode as found."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            seq_len = min(tc.seq_len, len(data.val) - 1)
            total, count = 0.0, 0
            val = ValBatches(data.val, tc.batch_size, seq_len, max_windows=tc.eval_windows, device=device)
            probe = MemoryProbe(model) if tc.memory_diagnostics else nullcontext()
            with probe:
                for x, y in val:
                    with amp:
                        _, loss = model(x, y)
                    total += loss.item() * y.numel()
                    count += y.numel()
            out = {"val_loss": total / count}
            if tc.memory_diagnostics:  # two-stage recall vs exact, share of value rows read
                out.update(probe.stats())
            if data.fact_queries and tc.fact_queries:
                queries = data.fact_queries[: tc.fact_queries]
                out.update(fact_recall(model, data, queries, tc.fact_max_new_tokens, amp))
    finally:
        model.train(was_training)
    return out


# ---------------------------------------------------------------- training

def train(cfg: RunConfig, log=print, data=None) -> dict:
    """Train (or resume) the run described by cfg; returns a summary (final metrics, counts, losses)."""
    threads = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        return _train(cfg, log, data)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: RunConfig, log, data) -> dict:
    tc = cfg.train
    device = resolve_device(tc.device)
    amp = autocast_for(tc.dtype, device)
    out = Path(tc.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = prepare_data(cfg.data, tc.cache_dir, log=log)
    need = tc.seq_len
    if data.fact_queries and tc.fact_queries:  # room for the longest prompt plus its answer
        longest = max(len(data.encode_prompt(q.prompt)) for q in data.fact_queries[: tc.fact_queries])
        need = max(need, longest + tc.fact_max_new_tokens)
    mcfg = model_config_for(cfg.model, data.vocab_size, need)
    ckpt_path = out / CHECKPOINT_NAME
    resuming = tc.resume and ckpt_path.exists()

    seed_everything(tc.seed)
    model = LanguageModel(mcfg).to(device)
    opt = build_optimizer(model, lr=tc.lr, weight_decay=tc.weight_decay, value_lr_mult=tc.value_lr_mult,
                          betas=(tc.beta1, tc.beta2), eps=tc.eps, total_steps=tc.steps,
                          warmup_steps=tc.warmup_steps, min_lr_ratio=tc.min_lr_ratio,
                          value_lr_decay_frac=tc.value_lr_decay_frac)
    sampler = TrainBatchSampler(data.train, tc.batch_size, tc.seq_len, seed=tc.seed, device=device)
    resolved = cfg.to_dict()
    resolved["model"] = mcfg.to_dict()
    step, extra = 0, {"tokens": 0, "train_seconds": 0.0}
    if resuming:
        c = load_checkpoint(ckpt_path, model, opt, expect_model_config=mcfg.to_dict(), restore_rng=True)
        sampler.load_state_dict(c.sampler_state)
        step, extra = c.step, {**extra, **c.extra}
        log(f"resumed from {ckpt_path} at step {step}")
        saved = c.train_config or {}
        changed = [d for sec in ("data", "train")
                   for d in config_diff(saved.get(sec, {}), resolved[sec], f"{sec}.")
                   if not d.startswith(("train.resume", "train.stop_after", "train.progress"))]
        if changed:  # allowed (e.g. more steps), but the run is then no longer a pure continuation
            log("resuming with changed settings: " + "; ".join(changed))
    else:
        atomic_write_text(out / "config.json", json.dumps(resolved, indent=1))
        data.tokenizer.save(out / "tokenizer.json")
    metrics = MetricsLog(out / "metrics.jsonl", step if resuming else None)

    counts = count_params(model, tc.seq_len)
    log(f"model ({mcfg.ffn}): {format_counts(counts)}")
    log("optimizer groups: " + ", ".join(f"{g['name']}={sum(p.numel() for p in g['params']):,}"
                                          for g in opt.param_groups)
        + f"; value path {'sparse (SparseAdam)' if opt.sparse_values else 'dense (AdamW)'}")
    if not resuming:
        metrics.write(kind="params", step=0, **counts)

    def checkpoint(at: int) -> None:
        save_checkpoint(ckpt_path, model, step=at, optimizer=opt, model_config=mcfg.to_dict(),
                        train_config=resolved, sampler_state=sampler.state_dict(), extra=extra)

    end = min(tc.steps, tc.stop_after) if tc.stop_after else tc.steps
    tokens_per_step = tc.batch_size * tc.seq_len
    losses: list[tuple[int, float]] = []
    last_eval: dict = {}
    pending, interval_s = [], 0.0
    bar = tqdm(total=tc.steps, initial=step, disable=not tc.progress, dynamic_ncols=True, desc=mcfg.ffn)

    def flush_log() -> None:
        nonlocal pending, interval_s
        vals = torch.stack(pending).cpu()  # one device sync per log interval
        extra["tokens"] += tokens_per_step * len(pending)
        extra["train_seconds"] += interval_s
        tok_s = tokens_per_step * len(pending) / max(interval_s, 1e-9)
        first = step - len(pending) + 1
        losses.extend((first + i, v) for i, v in enumerate(vals[:, 0].tolist()))
        mean = vals.mean(0).tolist()
        rec = {"kind": "train", "step": step, "loss": mean[0], "ce": mean[1], "grad_norm": mean[2],
               "losses": vals[:, 0].tolist(), "lr": opt.lrs().get("decay", tc.lr),
               "value_lr": opt.lrs().get("values"), "tokens_per_s": tok_s, "tokens": extra["tokens"]}
        rec.update({f"aux_{k}": v for k, v in zip(aux, mean[3:], strict=True)})
        metrics.write(**rec)
        bar.set_postfix(loss=f"{mean[0]:.3f}", tok_s=f"{tok_s:,.0f}")
        bar.update(len(pending))
        pending, interval_s = [], 0.0

    model.train()
    if tc.memory_diagnostics:  # dead-row statistics from the training batches, logged at each eval
        for layer in model.memory_layers():
            layer.values.count_reads(True)
    while step < end:
        t0 = time.perf_counter()
        opt.set_step(step)
        x, y = next(sampler)
        with amp:
            _, ce = model(x, y)
            aux = model.aux_losses()
            loss = ce + sum(aux.values(), ce.new_zeros(()))
        loss.backward()
        gnorm = clip_grad_norm(opt.params(), tc.grad_clip or None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.after_optimizer_step()
        step += 1
        pending.append(torch.stack([loss.detach().float(), ce.detach().float(), gnorm.detach().float()]
                                   + [a.detach().float() for a in aux.values()]))
        interval_s += time.perf_counter() - t0
        ckpt_due = (tc.ckpt_every and step % tc.ckpt_every == 0) or step == end
        if step % tc.log_every == 0 or ckpt_due:  # a checkpoint never holds unlogged steps
            flush_log()
        if (tc.eval_every and step % tc.eval_every == 0) or step == tc.steps:
            last_eval = {**evaluate(model, data, tc, amp), **training_reads(model)}
            metrics.write(kind="eval", step=step, **last_eval)
            bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
        if ckpt_due:
            checkpoint(step)
    bar.close()
    if not last_eval and step >= tc.steps:  # resumed a finished run: still report its metrics
        last_eval = evaluate(model, data, tc, amp)
    return {"step": step, "out_dir": str(out), "params": counts, "losses": losses,
            "train_loss": losses[-1][1] if losses else None, **last_eval,
            "tokens_per_s": extra["tokens"] / max(extra["train_seconds"], 1e-9)}


# ---------------------------------------------------------------- loading a finished run

def load_run(path, device: str = "cpu"):
    """(model, run config dict, tokenizer or None, checkpoint) from a run dir or checkpoint file."""
    from .data import Tokenizer

    meta = read_checkpoint_meta(path)
    if not meta.get("model_config"):
        raise ValueError(f"{path}: checkpoint has no model config; cannot rebuild the model")
    mcfg = LMConfig.from_dict(meta["model_config"])
    model = LanguageModel(mcfg)
    ckpt = load_checkpoint(path, model, expect_model_config=mcfg.to_dict())
    model.to(device).eval()
    tok_path = ckpt.path.parent / "tokenizer.json"
    tok = Tokenizer.load(tok_path) if tok_path.is_file() else None
    return model, meta.get("train_config") or {}, tok, ckpt
