"""Diagnostics of a memory layer: retrieval recall against the exact oracle, value-row usage."""

from __future__ import annotations

import contextlib

import torch

from .layers import UltraMemLayer
from .memory import MemoryLayer
from .v2 import UltraMemV2Layer


@torch.no_grad()
def retrieval_recall(layer: MemoryLayer, x_BTD: torch.Tensor) -> float:
    """Mean fraction of the exact top-m slots (brute force over the grid) that the default
    retrieval also keeps, over tokens and heads. 1.0 means the fast search lost nothing."""
    fast = layer.retrieve(x_BTD).indices
    exact = layer.retrieve(x_BTD, exact=True).indices
    hits = (fast.unsqueeze(-1) == exact.unsqueeze(-2)).any(-1).float()
    return hits.mean().item()


@torch.no_grad()
def row_reads(layer: MemoryLayer, x_BTD: torch.Tensor) -> torch.Tensor:
    """Per physical value row (N,), how many times the given inputs read it (all heads, slots)."""
    rows = layer.physical_rows(layer.retrieve(x_BTD).indices).reshape(-1)
    return torch.bincount(rows, minlength=layer.values.num_rows)


def used_rows(layer: MemoryLayer, x_BTD: torch.Tensor) -> torch.Tensor:
    """Boolean mask (N,) of physical value rows read for the given inputs (for dead-row counts)."""
    return row_reads(layer, x_BTD) > 0


class MemoryProbe:
    """Forward-pre hooks on a model's memory layers that record, while active, which value rows
    their inputs read (union over batches) and the two-stage recall on the first few tokens.

    with MemoryProbe(model, recall_tokens=32) as probe:
        ... run evaluation batches through model ...
    probe.stats() -> {"mem0_recall": ..., "mem0_rows_used": ..., ...}
    """

    def __init__(self, model, recall_tokens: int = 32):
        self.layers = list(model.memory_layers())
        self.recall_tokens = recall_tokens
        self.used = [None] * len(self.layers)
        self.recall = [None] * len(self.layers)
        self.handles = []

    def _hook(self, i):
        def hook(layer, args):
            x = args[0]
            mask = used_rows(layer, x)
            self.used[i] = mask if self.used[i] is None else self.used[i] | mask
            if self.recall[i] is None:
                flat = x.reshape(1, -1, x.shape[-1])[:, : self.recall_tokens]
                self.recall[i] = retrieval_recall(layer, flat)
        return hook

    def __enter__(self):
        self.handles = [layer.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def stats(self) -> dict[str, float]:
        out = {}
        for i, (mask, rec) in enumerate(zip(self.used, self.recall, strict=True)):
            if mask is not None:
                out[f"mem{i}_rows_used"] = mask.float().mean().item()
                out[f"mem{i}_recall"] = rec
        return out


@contextlib.contextmanager
def search_override(model, **changes):
    """Temporarily run every UltraMem (v1 or V2) layer of `model` with other search settings (for example
    `topm_search="exact"` or `stage1_topk=64`), to evaluate a trained model under another search.

    The changed config is validated like any other; the original configs come back on exit."""
    layers = [m for m in model.modules() if isinstance(m, (UltraMemLayer, UltraMemV2Layer))]
    if not layers:
        raise ValueError("search_override: the model has no UltraMem layer")
    saved = [layer.cfg for layer in layers]
    try:
        for layer, cfg in zip(layers, saved, strict=True):
            new = cfg.replace(**changes)
            layer.cfg = layer.retrieval.cfg = new
        yield layers
    finally:
        for layer, cfg in zip(layers, saved, strict=True):
            layer.cfg = layer.retrieval.cfg = cfg


def mean_pairwise_cosine(x_ND: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of distinct rows of x, in O(N D) instead of O(N^2 D).

    Rows of zero norm are dropped. 1.0: every row points the same way; ~0: unrelated directions.
    """
    x_ND = x_ND.detach().double()
    x_ND = x_ND[x_ND.norm(dim=-1) > 0]
    n = x_ND.shape[0]
    if n < 2:
        raise ValueError(f"mean_pairwise_cosine: needs at least 2 non-zero rows (got {n})")
    u_D = (x_ND / x_ND.norm(dim=-1, keepdim=True)).sum(0)
    # |sum of unit vectors|^2 = n (self pairs) + sum over ordered pairs of distinct rows
    return ((u_D @ u_D - n) / (n * (n - 1))).item()


def memory_output_grads(model, x_BT: torch.Tensor, y_BT: torch.Tensor) -> list[torch.Tensor]:
    """Per-token gradient of the LM loss with respect to each memory layer's output, (B*T, D) a
    layer: what every token asks its memory layer to add. Leaves no gradients on the model."""
    outs, handles = [], []

    def keep(_layer, _args, out):
        out.retain_grad()
        outs.append(out)

    for layer in model.memory_layers():
        handles.append(layer.register_forward_hook(keep))
    try:
        _, loss = model(x_BT, y_BT)
        loss.backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    return [o.grad.reshape(-1, o.shape[-1]).detach() for o in outs]
