"""Training: the run config, the optimiser schedule's driver, metrics, checkpoints, exact resume.

A run is described by RunConfig = {model: LMConfig, data: DataConfig, train: TrainConfig} and lives
in train.out_dir (see `runs.py` for the folder's files and rules). One training step reads:
batch -> `LanguageModel.forward` -> loss (+ auxiliary losses) -> backward -> clip -> optimiser
step -> `model.after_optimizer_step()` (every memory layer's post-step hook).

Exact resume: the batch of step n is a pure function of (seed, n), the lr a function of n, and
the checkpoint holds weights, optimiser moments, RNG states and the read-count tallies as of the
end of a step, after `after_optimizer_step`; evaluation runs inside fork_rng and draws no random
numbers. So resuming at step k replays steps k+1.. bit for bit (same device, dtype and threads).

Interruption: SIGINT / SIGTERM finish the current step, write a checkpoint and return (the CLI
exits with 130); `train.ckpt_every` steps and `train.ckpt_minutes` minutes bound what a crash loses.
"""

from __future__ import annotations

import json
import random
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import CHECKPOINT_NAME, atomic_write_text, config_diff, load_checkpoint, save_checkpoint
from .confbase import ConfigBase, fail, param
from .counting import count_params, format_counts
from .cpu_memory import keep_freed_memory
from .data import DataConfig, TrainBatchSampler, prepare_data
from .eval import evaluate, fact_recall, text_loss, training_reads  # noqa: F401  (re-exported: the 0.1 API)
from .model import LanguageModel, LMConfig
from .optim import build_optimizer, clip_grad_norm
from .runs import (  # noqa: F401  (load_run, read_metrics re-exported: the 0.1 API)
    MetricsLog,
    RunFolderError,
    RunLock,
    clear_run,
    existing_run_files,
    load_run,
    normalize_model_config,
    open_run_dir,
    read_metrics,
)

DTYPES = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
# Settings that may change between a run and its resumption without making it another run.
RESUME_NEUTRAL = ("train.resume", "train.stop_after", "train.progress", "train.overwrite",
                  "train.cpu_keep_freed")


@dataclass
class TrainConfig(ConfigBase):
    section = "train."

    out_dir: str = param("runs/run", "run folder (README, 'Run folders')")
    cache_dir: str = param("cache/data", "prepared (tokenised) data is cached here, shared by runs")
    steps: int = param(300, "optimiser steps", ge=1)
    batch_size: int = param(16, "sequences per step", ge=1)
    seq_len: int = param(128, "tokens per sequence", ge=1)
    lr: float = param(3e-3, "peak learning rate", gt=0)
    min_lr_ratio: float = param(0.1, "cosine ends at lr * min_lr_ratio", ge=0, le=1)
    warmup_steps: int = param(30, "linear warm-up steps (<= steps)", ge=0)
    weight_decay: float = param(0.1, "AdamW decay of the `decay` group (matrices outside the tables)", ge=0)
    beta1: float = param(0.9, "Adam beta1", ge=0, le=1)
    beta2: float = param(0.95, "Adam beta2", ge=0, le=1)
    eps: float = param(1e-8, "Adam eps", ge=0)
    grad_clip: float = param(1.0, "global grad-norm clip (0 disables clipping; the norm is still logged)",
                             ge=0)
    value_lr_mult: float = param(4.0, "M of SPEC section 4: value lr x M at step 0, decaying to x1", gt=0)
    value_lr_decay_frac: float = param(0.25, "S = frac * steps, the value-lr decay span", ge=0)
    # -- sparse value optimizer (README, 'Sparse value optimizer')
    value_optimizer: Literal["adamw", "sparse", "sparse_row", "auto"] = param(
        "adamw", "value tables' optimiser: `adamw` dense (SparseAdam for sparse_values tables), `sparse` / "
        "`sparse_row` SparseValueAdamW (full / per-row second moment), `auto` `sparse` for big tables")
    value_weight_decay: float = param(0.0, "decoupled weight decay of the value tables (lazy and exact on "
                                      "the sparse paths)", ge=0)
    memory_decay_all: bool = param(False, "also weight-decay the memory's norm gains and Tucker cores (keys "
                                   "and projections always are)")
    recipe: Literal["paper", "authors"] = param("paper", "defaults for the memory's training recipe "
                                                "(README, 'Recipes'); fields set explicitly win")
    dtype: Literal["auto", "fp32", "bf16"] = param("auto", "`auto`: bf16 autocast on CUDA, fp32 on CPU")
    device: Literal["auto", "cpu", "cuda"] = param("auto", "`auto`: CUDA when available")
    threads: int = param(0, "torch CPU threads (0 keeps torch's default)", ge=0)
    cpu_keep_freed: bool = param(True, "CPU, glibc: keep freed memory in the process instead of returning "
                                 "it to the OS every step (faster steps; RSS stays at its peak)")
    seed: int = param(0, "seed of the init, the sampler and dropout", ge=0)
    log_every: int = param(10, "steps per train-metrics record", ge=1)
    eval_every: int = param(100, "steps between evaluations (0: only at the end)", ge=0)
    eval_windows: int = param(64, "val windows of seq_len tokens per evaluation", ge=1)
    fact_queries: int = param(200, "fact-recall queries per evaluation (facts data only; 0 disables)", ge=0)
    fact_max_new_tokens: int = param(8, "tokens generated per fact query", ge=1)
    ckpt_every: int = param(0, "checkpoint every N steps (0: only by time and at the end)", ge=0)
    ckpt_minutes: float = param(10.0, "also checkpoint when this many minutes passed since the last one "
                                "(0: off)", ge=0)
    resume: bool | Literal["auto"] = param(False, "continue from out_dir's checkpoint (an error if there "
                                           "is none); `auto`: resume if there is one, else start fresh")
    overwrite: bool = param(False, "start afresh in a folder that holds a run (its run files are removed)")
    stop_after: int | None = param(None, "stop (with a checkpoint) after this many steps; resume later",
                                   ge=1)
    progress: bool = param(True, "tqdm bar")
    memory_diagnostics: bool = param(True, "at eval: retrieval recall, value rows read (val and training)")

    def validate(self):
        if self.warmup_steps > self.steps:
            self.fail("warmup_steps", f"must be <= steps={self.steps}", self.warmup_steps)
        if self.resume is True and self.overwrite:
            self.fail("overwrite", "cannot be combined with resume=true", self.overwrite)


@dataclass
class RunConfig(ConfigBase):
    """{model, data, train}. A model table without `vocab_size` / `max_seq_len` gets the data's
    vocabulary size and the train seq_len as placeholders; training fills in the real values."""

    model: LMConfig = param(default_factory=LMConfig, doc="the model (LMConfig)")
    data: DataConfig = param(default_factory=DataConfig, doc="the data (DataConfig)")
    train: TrainConfig = param(default_factory=TrainConfig, doc="training (TrainConfig)")

    @classmethod
    def from_dict(cls, d) -> RunConfig:
        if not isinstance(d, dict):
            fail("config", "must be a table with model / data / train tables", d)
        unknown = sorted(set(d) - {"model", "data", "train"})
        if unknown:
            raise ValueError(f"config: unknown section(s) {unknown}; allowed sections are "
                             "['data', 'model', 'train']")
        for name in ("model", "data", "train"):
            if name in d and not isinstance(d[name], dict):
                fail(name, "must be a table of keys", d[name])
        data = DataConfig.from_dict(dict(d.get("data", {})))
        train_d, model_d = apply_recipe(dict(d.get("train", {})), dict(d.get("model", {})))
        train = TrainConfig.from_dict(train_d)
        model = {"vocab_size": data.vocab_size, "max_seq_len": train.seq_len, **model_d}
        try:
            lm = LMConfig.from_dict(model)
        except ValueError as e:
            raise ValueError(f"model.{e}") from None
        return cls(model=lm, data=data, train=train)


# The memory's training recipe: what the paper describes (today's defaults) and what the authors'
# code does (SPEC section 9): weight decay on values, gains and cores, the value lr decaying over
# the whole run, their init. Placement (which blocks a memory reads) stays the model's own field.
RECIPES = {
    "paper": {"train": {}, "memory": {}},
    "authors": {"train": {"value_weight_decay": 0.1, "memory_decay_all": True, "value_lr_decay_frac": 1.0},
                "memory": {"init": "authors"}},
}


def apply_recipe(train: dict, model: dict) -> tuple[dict, dict]:
    """The train / model tables with `train.recipe`'s defaults filled in under what was given."""
    name = train.get("recipe", "paper")
    if name not in RECIPES:
        fail("train.recipe", f"must be one of {sorted(RECIPES)}", name)
    recipe = RECIPES[name]
    train = {**recipe["train"], **train}
    if recipe["memory"] and model.get("ffn") == "ultramem" and isinstance(model.get("memory", {}), dict):
        model = {**model, "memory": {**recipe["memory"], **model.get("memory", {})}}
    return train, model


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


def text_loss_of_run(model, tokenizer, run_cfg: dict, docs: list[str], max_tokens: int | None = None) -> dict:
    """`eval.text_loss` with a trained run's own settings (its seq_len, batch size and dtype, from
    the resolved config a checkpoint carries): `ultramem eval --data` and `exp ood` score this way."""
    tr = run_cfg.get("train") or {}
    seq_len = min(int(tr.get("seq_len", model.cfg.max_seq_len)), model.cfg.max_seq_len)
    amp = autocast_for(tr.get("dtype", "auto"), next(model.parameters()).device)
    return text_loss(model, tokenizer, docs, seq_len, int(tr.get("batch_size", 16)), max_tokens, amp)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_config_for(model: LMConfig | dict, vocab_size: int, seq_len: int) -> LMConfig:
    """LMConfig with the tokenizer's vocab size and room for seq_len positions."""
    d = model.to_dict() if isinstance(model, LMConfig) else dict(model)
    d["vocab_size"] = vocab_size
    d["max_seq_len"] = max(int(d.get("max_seq_len", 0) or 0), seq_len)
    return LMConfig.from_dict(d)


# ---------------------------------------------------------------- one training session

@dataclass
class _Session:
    """Everything one call of `train` works with (built by `_setup`)."""

    tc: TrainConfig
    out: Path
    data: object
    mcfg: LMConfig
    model: LanguageModel
    opt: object
    sampler: TrainBatchSampler
    amp: object
    resolved: dict
    log: object
    step: int = 0
    extra: dict = field(default_factory=lambda: {"tokens": 0, "train_seconds": 0.0})
    losses: list = field(default_factory=list)
    last_eval: dict = field(default_factory=dict)
    pending: list = field(default_factory=list)
    interval_s: float = 0.0
    last_ckpt_time: float = 0.0  # time.monotonic() of the last checkpoint (or of the loop's start)
    aux_names: tuple = ()
    metrics: MetricsLog | None = None
    bar: object = None
    stop_signal: int | None = None


def train(cfg: RunConfig, log=print, data=None) -> dict:
    """Train (or resume) the run described by cfg; returns a summary (final metrics, counts, losses).

    The summary has "interrupted": the signal number when SIGINT/SIGTERM stopped it (after a
    checkpoint), else None."""
    threads = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        out = open_run_dir(cfg.train.out_dir)
        with RunLock(out):
            return _train(cfg, out, log, data)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: RunConfig, out: Path, log, data) -> dict:
    resuming = _check_run_folder(cfg.train, out)
    s = _setup(cfg, out, log, data)
    if resuming:
        _resume(s)
    else:
        clear_run(out)
        atomic_write_text(out / "config.json", json.dumps(s.resolved, indent=1))
        s.data.tokenizer.save(out / "tokenizer.json")
    s.metrics = MetricsLog(out / "metrics.jsonl", s.step if resuming else None)
    counts = _log_header(s, write_params=not resuming)
    with _stop_on_signals(s):
        _loop(s)
    if not s.last_eval and s.step >= s.tc.steps:  # resumed a finished run: still report its metrics
        s.last_eval = evaluate(s.model, s.data, s.tc, s.amp)
    return {"step": s.step, "out_dir": str(out), "params": counts, "losses": s.losses,
            "train_loss": s.losses[-1][1] if s.losses else None, **s.last_eval,
            "tokens_per_s": s.extra["tokens"] / max(s.extra["train_seconds"], 1e-9),
            "interrupted": s.stop_signal}


def _check_run_folder(tc: TrainConfig, out: Path) -> bool:
    """Whether to resume; refuses to train over a run or to 'resume' one without a checkpoint."""
    has_ckpt = (out / CHECKPOINT_NAME).exists()
    if tc.resume is True and not has_ckpt:
        raise RunFolderError(f"train.resume: '{out}' has no {CHECKPOINT_NAME} to resume from; "
                             "drop --resume to start a new run (add --overwrite if the folder holds one)")
    if tc.resume == "auto" and has_ckpt:
        return True
    if tc.resume is True:
        return True
    found = existing_run_files(out)
    if found and not (tc.overwrite or tc.resume == "auto"):
        raise RunFolderError(f"train.out_dir: '{out}' already holds a run ({', '.join(found)}); pass "
                             "--resume to continue it or --overwrite to start afresh there")
    return False


def _setup(cfg: RunConfig, out: Path, log, data) -> _Session:
    tc = cfg.train
    device = resolve_device(tc.device)
    if device.type == "cpu" and tc.cpu_keep_freed and keep_freed_memory():  # process-wide: cpu_memory.py
        log("cpu: malloc keeps freed memory in the process (train.cpu_keep_freed=false to switch off)")
    if data is None:
        data = prepare_data(cfg.data, tc.cache_dir, log=log)
    need = tc.seq_len
    if data.fact_queries and tc.fact_queries:  # room for the longest prompt plus its answer
        longest = max(len(data.encode_prompt(q.prompt)) for q in data.fact_queries[: tc.fact_queries])
        need = max(need, longest + tc.fact_max_new_tokens)
    mcfg = model_config_for(cfg.model, data.vocab_size, need)
    seed_everything(tc.seed)
    model = LanguageModel(mcfg).to(device)
    opt = build_optimizer(model, lr=tc.lr, weight_decay=tc.weight_decay, value_lr_mult=tc.value_lr_mult,
                          betas=(tc.beta1, tc.beta2), eps=tc.eps, total_steps=tc.steps,
                          warmup_steps=tc.warmup_steps, min_lr_ratio=tc.min_lr_ratio,
                          value_lr_decay_frac=tc.value_lr_decay_frac, value_optimizer=tc.value_optimizer,
                          value_weight_decay=tc.value_weight_decay, decay_memory_all=tc.memory_decay_all)
    sampler = TrainBatchSampler(data.train, tc.batch_size, tc.seq_len, seed=tc.seed, device=device)
    resolved = cfg.to_dict()
    resolved["model"] = mcfg.to_dict()
    return _Session(tc=tc, out=out, data=data, mcfg=mcfg, model=model, opt=opt, sampler=sampler,
                    amp=autocast_for(tc.dtype, device), resolved=resolved, log=log)


def _resume(s: _Session) -> None:
    path = s.out / CHECKPOINT_NAME
    c = load_checkpoint(path, s.model, s.opt, expect_model_config=s.mcfg.to_dict(), restore_rng=True,
                        normalize_config=normalize_model_config)
    s.sampler.load_state_dict(c.sampler_state)
    reads = c.extra.pop("read_counts", None)
    s.step, s.extra = c.step, {**s.extra, **c.extra}
    s.log(f"resumed from {path} at step {s.step}")
    _restore_read_counts(s.model, reads)
    saved = c.train_config or {}
    changed = [d for sec in ("data", "train")
               for d in config_diff(saved.get(sec, {}), s.resolved[sec], f"{sec}.")
               if not d.startswith(RESUME_NEUTRAL)]
    if changed:  # allowed (e.g. more steps), but the run is then no longer a pure continuation
        s.log("resuming with changed settings: " + "; ".join(changed))


def _log_header(s: _Session, write_params: bool) -> dict:
    counts = count_params(s.model, s.tc.seq_len)
    s.log(f"model ({s.mcfg.ffn}): {format_counts(counts)}")
    s.log("optimizer groups: " + ", ".join(f"{g['name']}={sum(p.numel() for p in g['params']):,}"
                                            for g in s.opt.param_groups)
          + f"; value paths: {s.opt.describe_value_paths()}")
    if write_params:
        s.metrics.write(kind="params", step=0, **counts)
    return counts


# ---------------------------------------------------------------- the loop

def _loop(s: _Session) -> None:
    tc = s.tc
    end = min(tc.steps, tc.stop_after) if tc.stop_after else tc.steps
    s.bar = tqdm(total=tc.steps, initial=s.step, disable=not tc.progress, dynamic_ncols=True,
                 desc=s.mcfg.ffn)
    s.model.train()
    s.last_ckpt_time = time.monotonic()
    if tc.memory_diagnostics:  # dead-row statistics from the training batches, logged at each eval
        for layer in s.model.memory_layers():
            if layer.values.read_counts is None:
                layer.values.count_reads(True)
    while s.step < end:
        t0 = time.perf_counter()
        s.pending.append(_train_step(s))
        s.interval_s += time.perf_counter() - t0
        stopping = s.stop_signal is not None
        ckpt_due = (tc.ckpt_every and s.step % tc.ckpt_every == 0) or s.step == end or stopping or (
            tc.ckpt_minutes and time.monotonic() - s.last_ckpt_time >= 60 * tc.ckpt_minutes)
        if s.step % tc.log_every == 0 or ckpt_due:  # a checkpoint never holds unlogged steps
            _flush_log(s)
        eval_due = ((tc.eval_every and s.step % tc.eval_every == 0) or s.step == tc.steps) and not stopping
        if eval_due or ckpt_due:  # lazy value decay (sparse path): evaluate and save up-to-date weights
            s.opt.flush_decay()
        if eval_due:
            s.last_eval = {**evaluate(s.model, s.data, tc, s.amp), **training_reads(s.model)}
            s.metrics.write(kind="eval", step=s.step, **s.last_eval)
            s.bar.write(f"step {s.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in s.last_eval.items()))
        if ckpt_due:
            _checkpoint(s)
        if stopping:
            s.log(f"stopped by signal {s.stop_signal} at step {s.step}; checkpoint saved in {s.out} "
                  "(continue with --resume)")
            break
    s.bar.close()


def _train_step(s: _Session) -> torch.Tensor:
    """One optimiser step; returns [loss, ce, grad norm, aux losses...] (not synced to the host)."""
    s.opt.set_step(s.step)
    x, y = next(s.sampler)
    with s.amp:
        _, ce = s.model(x, y)
        aux = s.model.aux_losses()
        loss = ce + sum(aux.values(), ce.new_zeros(()))
    loss.backward()
    gnorm = clip_grad_norm(s.opt.params(), s.tc.grad_clip or None)
    s.opt.step()
    s.opt.zero_grad(set_to_none=True)
    s.model.after_optimizer_step()
    s.step += 1
    s.aux_names = tuple(aux)
    return torch.stack([loss.detach().float(), ce.detach().float(), gnorm.detach().float()]
                       + [a.detach().float() for a in aux.values()])


def _flush_log(s: _Session) -> None:
    vals = torch.stack(s.pending).cpu()  # one device sync per log interval
    tokens_per_step = s.tc.batch_size * s.tc.seq_len
    s.extra["tokens"] += tokens_per_step * len(s.pending)
    s.extra["train_seconds"] += s.interval_s
    tok_s = tokens_per_step * len(s.pending) / max(s.interval_s, 1e-9)
    first = s.step - len(s.pending) + 1
    s.losses.extend((first + i, v) for i, v in enumerate(vals[:, 0].tolist()))
    mean = vals.mean(0).tolist()
    lrs = s.opt.lrs()
    rec = {"kind": "train", "step": s.step, "loss": mean[0], "ce": mean[1], "grad_norm": mean[2],
           "losses": vals[:, 0].tolist(), "lr": lrs.get("decay", s.tc.lr), "value_lr": lrs.get("values"),
           "tokens_per_s": tok_s, "tokens": s.extra["tokens"]}
    rec.update({f"aux_{k}": v for k, v in zip(s.aux_names, mean[3:], strict=True)})
    s.metrics.write(**rec)
    s.bar.set_postfix(loss=f"{mean[0]:.3f}", tok_s=f"{tok_s:,.0f}")
    s.bar.update(len(s.pending))
    s.pending, s.interval_s = [], 0.0


def _checkpoint(s: _Session) -> None:
    extra = {**s.extra, "read_counts": _read_counts(s.model)}
    save_checkpoint(s.out / CHECKPOINT_NAME, s.model, step=s.step, optimizer=s.opt,
                    model_config=s.mcfg.to_dict(), train_config=s.resolved,
                    sampler_state=s.sampler.state_dict(), extra=extra)
    s.last_ckpt_time = time.monotonic()


def _read_counts(model) -> list:
    """Each memory table's read tally since the last eval (so a resumed run's stats match); a table
    several layers read (UltraMemV2's shared pools) is stored once, under its first reader."""
    seen, out = set(), []
    for layer in model.memory_layers():
        counts = getattr(layer.values, "read_counts", None)
        out.append(None if id(layer.values) in seen else counts)
        seen.add(id(layer.values))
    return out


def _restore_read_counts(model, saved) -> None:
    for layer, counts in zip(model.memory_layers(), saved or [], strict=False):
        if counts is not None and hasattr(layer.values, "read_counts"):
            layer.values.read_counts = counts.to(layer.values.weight.device).clone()


@contextmanager
def _stop_on_signals(s: _Session):
    """SIGINT/SIGTERM set a flag the loop checks after each step (then it checkpoints and stops);
    a second signal interrupts at once. Only in the main thread (signal's rule)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        if s.stop_signal is not None:
            raise KeyboardInterrupt
        s.stop_signal = signum
        s.log(f"signal {signum}: finishing step {s.step + 1}, then checkpointing (again to abort)")

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)

