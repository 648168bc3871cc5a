"""Key scoring: every key of both sides against the normed queries, one batched product.

Shape legend: S the two sides (0 = row, 1 = column), N tokens, Dk query/key width per side,
J scored columns per side (heads * rank * keys, in that order).
"""

from __future__ import annotations

import torch

from .dispatch import register, select


def score_keys_reference(q_NSK: torch.Tensor, keys_SKJ: torch.Tensor) -> torch.Tensor:
    """s[s, n, j] = sum_k q[n, s, k] keys[s, k, j] (the oracle)."""
    return torch.einsum("nsk,skj->snj", q_NSK, keys_SKJ.to(q_NSK.dtype))


def score_keys_bmm(q_NSK: torch.Tensor, keys_SKJ: torch.Tensor) -> torch.Tensor:
    """Both sides in one `bmm` against the (S, Dk, J) key matrix (the layout the CPU matmul reads
    fastest; see `TuckerRetrieval._build_key_matrix`)."""
    return torch.bmm(q_NSK.transpose(0, 1), keys_SKJ.to(q_NSK.dtype))


register("score_keys", "reference", score_keys_reference, reference=True)
register("score_keys", "bmm", score_keys_bmm)


def score_keys(q_NSK: torch.Tensor, keys_SKJ: torch.Tensor) -> torch.Tensor:
    """(S, N, J) scores of every key column against each token's query half of that side."""
    return select("score_keys", q_NSK).fn(q_NSK, keys_SKJ)
