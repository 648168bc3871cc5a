"""Evaluation of a language model: val loss on fixed windows, fact recall, value-row usage.

Everything here leaves the model's train/eval mode and the global RNG as it found them, so an
evaluation in the middle of training does not change the training run.
"""

from __future__ import annotations

import math
from collections import defaultdict
from contextlib import nullcontext

import torch

from .data import ValBatches, fact_recall_accuracy
from .diagnostics import MemoryProbe
from .model import IGNORE_INDEX


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
        if getattr(layer.values, "read_counts", None) is None:
            continue
        counts = layer.values.take_read_counts()
        total = counts.sum().item()
        if total == 0:
            continue
        top = counts.topk(max(1, counts.numel() // 10)).values.sum().item()
        out[f"mem{i}_rows_read_train"] = (counts > 0).float().mean().item()
        out[f"mem{i}_top10pct_reads"] = top / total
    return out


def val_loss(model, data, tc, amp, device) -> tuple[float, dict]:
    """Mean token cross-entropy over the fixed val windows (+ memory probe stats when enabled)."""
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
    # two-stage recall vs exact, share of value rows read
    return total / count, (probe.stats() if tc.memory_diagnostics else {})


def evaluate(model, data, tc, amp) -> dict:
    """Val loss on fixed windows (+ fact recall on facts data); leaves RNG and train mode as found."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            loss, probe_stats = val_loss(model, data, tc, amp, device)
            out = {"val_loss": loss, **probe_stats}
            if data.fact_queries and tc.fact_queries:
                queries = data.fact_queries[: tc.fact_queries]
                out.update(fact_recall(model, data, queries, tc.fact_max_new_tokens, amp))
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def text_loss(model, tokenizer, docs: list[str], seq_len: int, batch_size: int = 16,
              max_tokens: int | None = None, amp=None) -> dict:
    """Loss of `model` on arbitrary text with the run's tokenizer: mean nats per token and bits
    per byte (UTF-8 bytes of the text scored), so runs with different vocabularies compare.

    Documents are joined as in training (each starts with end-of-text); windows of seq_len + 1
    tokens overlap by one, so every token after the first is predicted exactly once. End-of-text
    targets are left out: the bytes counted are the documents' own."""
    if not docs:
        raise ValueError("data: no documents to evaluate")
    ids, n_bytes = [], 0
    for doc in docs:
        ids += [tokenizer.eos_id] + tokenizer.encode(doc)
        n_bytes += len(doc.encode("utf-8"))
        if max_tokens is not None and len(ids) > max_tokens:
            ids, n_bytes = ids[: max_tokens + 1], _bytes_of(tokenizer, ids[1: max_tokens + 1])
            break
    stream = torch.tensor(ids, dtype=torch.long)
    device = next(model.parameters()).device
    windows = [stream[s: s + seq_len + 1] for s in range(0, len(ids) - 1, seq_len)]
    nats, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for b in range(0, len(windows), batch_size):
            nats_b, count_b = _windows_nats(model, windows[b: b + batch_size], tokenizer.eos_id, device, amp)
            nats, count = nats + nats_b, count + count_b
    finally:
        model.train(was_training)
    return {"loss": nats / max(count, 1), "bits_per_byte": nats / math.log(2) / max(n_bytes, 1),
            "tokens": count, "bytes": n_bytes, "documents": len(docs)}


def _windows_nats(model, windows, eos_id: int, device, amp) -> tuple[float, int]:
    """Summed cross-entropy (nats) and target count over a batch of windows of unequal length."""
    width = max(len(w) for w in windows)
    x = torch.full((len(windows), width - 1), eos_id, dtype=torch.long)
    y = torch.full((len(windows), width - 1), IGNORE_INDEX, dtype=torch.long)
    for i, w in enumerate(windows):
        x[i, : len(w) - 1], y[i, : len(w) - 1] = w[:-1], w[1:]
    y[y == eos_id] = IGNORE_INDEX
    x, y = x.to(device), y.to(device)
    with amp or nullcontext():
        logits, _ = model(x)
    ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum",
                                           ignore_index=IGNORE_INDEX)
    return ce.item(), int((y != IGNORE_INDEX).sum())


def _bytes_of(tokenizer, ids: list[int]) -> int:
    return len(tokenizer.decode(ids, skip_special_tokens=True).encode("utf-8"))
