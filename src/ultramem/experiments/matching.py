"""Size matching for fair comparisons (SPEC section 6): equal activated params per token for every
kind, and equal total params for the sparse kinds (MoE, PKM, UltraMem).

Counts come from instantiating the model and calling `count_params`, so whatever the counting
rules say (keys are activated, values are sparse, ...) is what gets matched.
"""

from __future__ import annotations

import copy

import torch

from ..counting import count_params
from ..model import LanguageModel, LMConfig


def counts_for(model_dict: dict, vocab_size: int, seq_len: int) -> dict[str, int]:
    cfg = LMConfig.from_dict({**model_dict, "vocab_size": vocab_size, "max_seq_len": seq_len})
    with torch.random.fork_rng():
        return count_params(LanguageModel(cfg), seq_len)


def _set(d: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for key in path:
        d = d.setdefault(key, {})
    d[last] = value


def _search(model: dict, field: str, lo: int, hi: int, key: str, target: int, vocab: int, seq: int,
            step: int = 1) -> tuple[dict, dict]:
    """Smallest value of `field` (a multiple of step in [lo, hi]) whose count[key] >= target, or the
    neighbour below it if that one is closer. Counts grow monotonically with these fields."""
    lo, hi = -(-lo // step), hi // step
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        trial = copy.deepcopy(model)
        _set(trial, field, mid * step)
        c = counts_for(trial, vocab, seq)
        if best is None or abs(c[key] - target) < abs(best[1][key] - target):
            best = (trial, c)
        if c[key] < target:
            lo = mid + 1
        else:
            hi = mid - 1
    if best is None:
        raise ValueError(f"{field}: no value in [{lo * step}, {hi * step}] to match {key}={target}")
    return best


def match(model: dict, vocab: int, seq: int, activated: int, total: int | None = None,
          hidden_field: str = "ffn_hidden", size_field: str = "memory.num_keys",
          size_range: tuple[int, int] = (2, 4096), rounds: int = 3) -> tuple[dict, dict]:
    """Adjust `size_field` to hit `total` (if given) and `hidden_field` to hit `activated`.

    The two interact (keys grow with num_keys and count as activated), so alternate a few rounds.
    """
    counts = counts_for(model, vocab, seq)
    for _ in range(rounds):
        if total is not None:
            model, counts = _search(model, size_field, *size_range, "total", total, vocab, seq)
        model, counts = _search(model, hidden_field, 8, 64 * 1024, "activated", activated, vocab, seq, 2)
    return model, counts
