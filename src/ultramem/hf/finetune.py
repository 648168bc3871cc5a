"""Teach a trained model new facts and measure what it learns and what it forgets.

Methods (each starts from the same trained weights):
- "memory": `add_memory` (zero-initialised output, so nothing changes at step 0) and
  `freeze_except_memory`: only the memory layer trains (queries, keys, values, output);
- "memory_values": `add_memory(zero="values")` and only the value table trains, so each step
  changes just the rows the new-fact tokens read (sparse memory fine-tuning; retrieval and
  output projection stay at their random init);
- "memory_sparse": as "memory_values", but each step only the `sparse_rows` value rows with the
  highest TF-IDF score (reads in this batch x rarity in the original data) train: the row choice
  of sparse memory fine-tuning (Lin et al. 2025, arXiv 2510.15103);
- "full": every parameter trains;
- "lora": LoRA adapters (peft) on every linear of attention and FFN; only they train.

Training text: bios of a fresh batch of generated people (`ultramem.data.facts`; names that occur
in the original corpus are excluded). Learning = greedy recall of the new facts (the phrasing
seen in training, and the held-out phrasing). Retention = val loss on the model's original data
and recall of the original facts, before and after.

Shape legend: B batch, T time.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data import DataConfig, prepare_data
from ..data.facts import FactConfig, FactQuery, generate_people, name_capacity, prompt_for, render
from ..data.sampler import TrainBatchSampler
from ..eval import evaluate, fact_recall
from ..memory import memory_layers
from ..runs import load_run
from ..train import TrainConfig
from .augment import ATTACHMENT, add_memory, freeze_except_memory
from .configuration import UltraMemLMConfig
from .modeling import UltraMemForCausalLM

METHODS = ("memory", "memory_values", "memory_sparse", "full", "lora")


@dataclass
class FinetuneConfig:
    methods: tuple = METHODS
    new_people: int = 20  # people in the fresh batch of facts
    new_seed: int = 1000  # fact-generator seed of the fresh batch
    repetitions: int = 5  # passes over the new bios in the training text (templates cycle)
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 64
    lr_memory: float = 1e-2
    value_lr_mult: float = 4.0  # the memory's value table trains at lr_memory * this (SPEC section 4)
    lr_full: float = 1e-3
    lr_lora: float = 1e-2
    lora_rank: int = 8
    sparse_rows: int = 256  # memory_sparse: value rows trained per step (per memory layer)
    background_batches: int = 32  # memory_sparse: original-data batches that set each row's rarity
    placement: str = ""  # memory spans; default "m:m" with m the middle block
    memory: dict = field(default_factory=lambda: {"num_keys": 64, "key_dim": 16, "heads": 2, "topk": 16})
    eval_windows: int = 64  # original-data val windows of seq_len tokens
    old_fact_queries: int = 200  # original facts asked before/after (facts data only)
    fact_max_new_tokens: int = 8
    seed: int = 0
    threads: int = 1  # torch CPU threads; 0 keeps torch's default
    cache_dir: str | None = None  # data cache of the original run (default: the run's)

    def __post_init__(self):
        self.methods = tuple(self.methods)
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"methods: must be a non-empty list from {list(METHODS)} "
                             f"(got {list(self.methods)})")
        for name in ("new_people", "repetitions", "steps", "batch_size", "seq_len", "lora_rank",
                     "eval_windows", "fact_max_new_tokens", "sparse_rows", "background_batches"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: must be an int >= 1 (got {v!r})")
        for name in ("lr_memory", "lr_full", "lr_lora", "value_lr_mult"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0 (got {getattr(self, name)!r})")


# ---------------------------------------------------------------- the new facts

def new_fact_batch(fc: FactConfig, exclude_names: set[str]) -> tuple[list[str], list[FactQuery]]:
    """(training bios, queries) for fc.num_people fresh people whose names are not in exclude_names.

    Like `build_fact_corpus`: `fc.repetitions` bios per person, each fact cycling through the
    training templates; one query per fact in the phrasing of pass 0 and one per held-out template."""
    pool = generate_people(dataclasses.replace(fc, num_people=min(4 * fc.num_people + len(exclude_names),
                                                                  name_capacity())))
    people = [p for p in pool if p.name not in exclude_names][: fc.num_people]
    if len(people) < fc.num_people:
        raise ValueError(f"new_people: only {len(people)} unused names left (got {fc.num_people})")
    attrs, docs, queries = list(fc.attributes), [], []
    for r in range(fc.repetitions):
        for n, person in enumerate(people):
            lines = [render(a, fc.train_ids[(n + k + r) % fc.train_templates], person.name, person.facts[a])
                     for k, a in enumerate(attrs)]
            docs.append("\n".join(lines))
    for n, person in enumerate(people):
        for k, a in enumerate(attrs):
            seen = fc.train_ids[(n + k) % fc.train_templates]
            for t, held in [(seen, False)] + [(h, True) for h in fc.heldout_ids]:
                queries.append(FactQuery(prompt_for(a, t, person.name), person.facts[a], person.name, a, t,
                                         held))
    return docs, queries


class _Prompts:
    """What `eval.fact_recall` needs from a data object: the tokenizer and prompt encoding."""

    def __init__(self, tokenizer):
        self.tokenizer, self.eos_id = tokenizer, tokenizer.eos_id

    def encode_prompt(self, prompt: str) -> list[int]:
        return [self.eos_id] + self.tokenizer.encode(prompt)


def _tokens(tokenizer, docs: list[str]) -> np.ndarray:
    ids = []
    for doc in docs:  # documents start with <|endoftext|>, as in training
        ids.append(tokenizer.eos_id)
        ids.extend(tokenizer.encode(doc))
    return np.asarray(ids, dtype=np.int64)


# ---------------------------------------------------------------- methods

def _prepare(method: str, hf: UltraMemForCausalLM, cfg: FinetuneConfig) -> list[dict]:
    """Make `hf` ready for `method`; returns the optimiser's parameter groups."""
    if method == "full":
        return [{"params": list(hf.parameters()), "lr": cfg.lr_full}]
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        get_peft_model(hf, LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.0,
                                      target_modules=["qkv", "proj", "w_in", "w_down"]))
        return [{"params": [p for p in hf.parameters() if p.requires_grad], "lr": cfg.lr_lora}]
    n = hf.config.num_hidden_layers
    values_only = method in ("memory_values", "memory_sparse")
    add_memory(hf, cfg.memory, cfg.placement or f"{n // 2}:{n // 2}",
               zero="values" if values_only else "output")
    freeze_except_memory(hf, values_only=values_only)
    values = {id(p) for layer in memory_layers(hf) for p in layer.value_parameters()}
    trainable = [p for p in hf.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) in values], "lr": cfg.lr_memory * cfg.value_lr_mult}]
    rest = [p for p in trainable if id(p) not in values]
    return groups + ([{"params": rest, "lr": cfg.lr_memory}] if rest else [])


class _RowSelector:
    """memory_sparse: per step, keep the gradient of only the `top` value rows (per added memory
    layer) with the highest TF-IDF score: reads in this batch x log((B + 1) / (b + 1)), with b the
    number of B original-data batches that read the row. Rows the original data reads often are
    left alone, which is what protects it (the paper's argument)."""

    def __init__(self, tables: list, top: int):
        self.tables, self.top, self.idf = tables, top, []

    @torch.no_grad()
    def background(self, lm, sampler: TrainBatchSampler, batches: int) -> None:
        df = [torch.zeros(t.num_rows) for t in self.tables]
        for t in self.tables:
            t.count_reads(True)
        lm.train()  # reads are counted in training mode
        for _ in range(batches):
            lm(next(sampler)[0])
            for d, t in zip(df, self.tables, strict=True):
                d += (t.take_read_counts() > 0).float()
        self.idf = [torch.log((batches + 1) / (d + 1)) for d in df]

    @torch.no_grad()
    def mask_grads(self) -> None:
        for t, idf in zip(self.tables, self.idf, strict=True):
            score = t.take_read_counts().float() * idf
            best = score.topk(min(self.top, t.num_rows))
            keep = torch.zeros(t.num_rows, dtype=t.weight.dtype)
            keep[best.indices[best.values > 0]] = 1  # rows this batch did not read stay out
            if t.weight.grad is not None:
                t.weight.grad.mul_(keep.repeat_interleave(t.num_chunks)[:, None])


def _train(hf: UltraMemForCausalLM, groups: list[dict], tokens: np.ndarray, cfg: FinetuneConfig,
           selector: _RowSelector | None = None) -> float:
    """Constant-lr AdamW (no weight decay) on random windows of the new-fact text; last loss.

    Runs the wrapped LanguageModel (hooks of an added memory and LoRA layers live inside it)."""
    sampler = TrainBatchSampler(tokens, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    lm, added = hf.model, memory_layers(hf)
    hf.train()
    loss = torch.zeros(())
    for _ in range(cfg.steps):
        x_BT, y_BT = next(sampler)
        _, loss = lm(x_BT, y_BT)
        loss.backward()
        if selector is not None:
            selector.mask_grads()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for layer in added:  # UltraMem's Tucker refresh, as the library's trainer does
            layer.after_optimizer_step()
    hf.eval()
    return loss.item()


def _measure(lm, data, tc: TrainConfig, prompts: _Prompts, new_queries, cfg) -> dict:
    fp32 = torch.autocast("cpu", enabled=False)
    old = evaluate(lm, data, tc, fp32)
    new = fact_recall(lm, prompts, new_queries, cfg.fact_max_new_tokens, fp32)
    return {"orig_val_loss": old["val_loss"], "orig_fact_acc": old.get("fact_acc_seen", old.get("fact_acc")),
            "new_fact_acc_seen": new.get("fact_acc_seen"),
            "new_fact_acc_heldout": new.get("fact_acc_heldout")}


# ---------------------------------------------------------------- the comparison

def run_finetune(run, out, cfg: FinetuneConfig | None = None, log=print) -> dict:
    """Fine-tune copies of a trained run with each method; writes out/results.json and out/table.md."""
    cfg = cfg or FinetuneConfig()
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(run, Path(out), cfg, log)
    finally:
        torch.set_num_threads(threads)


def _run(run, out: Path, cfg: FinetuneConfig, log) -> dict:
    base, run_cfg, tok, ckpt = load_run(run)
    if tok is None or not run_cfg.get("data"):
        raise ValueError(f"{ckpt.path}: needs the run's config.json data section and tokenizer.json")
    dc = DataConfig.from_dict(run_cfg["data"])
    data = prepare_data(dc, cfg.cache_dir or run_cfg["train"]["cache_dir"], log=lambda m: None)
    old_names = {q.person for q in data.fact_queries}
    fc = dataclasses.replace(dc.fact_config(), seed=cfg.new_seed, num_people=cfg.new_people,
                             repetitions=cfg.repetitions)
    docs, new_queries = new_fact_batch(fc, old_names)
    tokens = _tokens(tok, docs)
    tc = TrainConfig(out_dir=str(out), batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                     eval_windows=cfg.eval_windows,
                     fact_queries=cfg.old_fact_queries if data.fact_queries else 0,
                     fact_max_new_tokens=cfg.fact_max_new_tokens, memory_diagnostics=False)
    prompts = _Prompts(tok)
    rows = [{"method": "before", "trainable": 0, "seconds": 0.0,
             **_measure(base, data, tc, prompts, new_queries, cfg)}]
    log(f"before: {rows[0]}; new-fact text {len(tokens):,} tokens, {len(new_queries)} queries")
    for method in cfg.methods:
        row = _finetune_one(method, base, data, tokens, cfg)
        model = row.pop("model")
        rows.append({**row, **_measure(model, data, tc, prompts, new_queries, cfg)})
        log(f"{method}: {rows[-1]}")
    table = results_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "run": str(run),
                                                  "rows": rows}, indent=1))
    (out / "table.md").write_text(table + "\n")
    return {"rows": rows, "table": table}


def _finetune_one(method: str, base, data, tokens: np.ndarray, cfg: FinetuneConfig) -> dict:
    """Fine-tune a copy of `base` with `method`; the row's "model" is the trained LanguageModel."""
    torch.manual_seed(cfg.seed)
    lm = copy.deepcopy(base)
    lm.after_optimizer_step()  # a copied tensor restarts its version counter: re-stamp the Tucker state
    hf = UltraMemForCausalLM(UltraMemLMConfig(lm_config=base.cfg.to_dict()), lm)
    groups = _prepare(method, hf, cfg)
    t0 = time.perf_counter()
    selector = None
    if method == "memory_sparse":
        selector = _RowSelector([layer.values for layer in getattr(hf, ATTACHMENT).layers], cfg.sparse_rows)
        background = TrainBatchSampler(data.train, cfg.batch_size, cfg.seq_len, seed=cfg.seed + 1)
        selector.background(hf.model, background, cfg.background_batches)
    last = _train(hf, groups, tokens, cfg, selector)
    return {"method": method, "trainable": sum(p.numel() for g in groups for p in g["params"]),
            "seconds": time.perf_counter() - t0, "final_train_loss": last, "model": hf.model}


def results_table(rows: list[dict]) -> str:
    before = rows[0]
    head = ["method", "trainable params", "new facts (seen)", "new facts (held-out)", "orig val loss",
            "orig facts", "time s"]

    def delta(r, key, spec):
        if r[key] is None:
            return "-"
        d = "" if r is before else f" ({r[key] - before[key]:+{spec}})"
        return f"{r[key]:{spec}}{d}"

    body = [[r["method"], f"{r['trainable']:,}", delta(r, "new_fact_acc_seen", ".3f"),
             delta(r, "new_fact_acc_heldout", ".3f"), delta(r, "orig_val_loss", ".3f"),
             delta(r, "orig_fact_acc", ".3f"), f"{r['seconds']:.0f}"] for r in rows]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
