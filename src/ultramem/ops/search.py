"""The two search stages of TDQKR as ops (torch references here; Triton kernels in `triton_topk.py`).

Shape legend: S the two sides (0 = row, 1 = column), N tokens, Dk query/key width per side,
H heads, R Tucker rank, P keys per side (n'), Q stage-1 candidates (m1), M kept (m),
J = H*R*P key columns per side, in (head, rank, key) order (see `TuckerRetrieval._build_key_matrix`).

- `stage1_topk(q_NSK, keys_SKJ, ut_SHR, m1)`: score every key of both sides against the query,
  rank them by the rank-1 proxy u^T s (row side) / t^T s (column side) and keep the m1 best per
  (side, token, head); returns the candidates' indices and their per-rank scores. A fused kernel
  never writes the (S, N, J) score matrix.
- `grid_topm(sr_XHRQ, sc_XHRQ, core_HRR, m)`: the stage-2 grid: summed-core bilinear scores of
  every (row, column) candidate pair, and the flat indices (row * Q + column) of the m best,
  best first. core_HRR None = additive scores (R = 1: row + column).
"""

from __future__ import annotations

import torch

from .dispatch import register, select
from .scoring import score_keys
from .topk import topk_indices


def stage1_topk_reference(q_NSK: torch.Tensor, keys_SKJ: torch.Tensor, ut_SHR: torch.Tensor,
                          m1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cand_SNHQ indices, cand_SNHRQ scores): the full score matrix, then top-m1 of the proxy."""
    N, S = q_NSK.shape[:2]
    H, R = ut_SHR.shape[1:]
    s_SNHRP = score_keys(q_NSK, keys_SKJ).view(S, N, H, R, -1)
    proxy_SNHP = (ut_SHR.unsqueeze(1).unsqueeze(-2).to(s_SNHRP.dtype) @ s_SNHRP).squeeze(-2)
    cand_SNHQ = topk_indices(proxy_SNHP, m1, sorted=False)
    idx_SNHRQ = cand_SNHQ.unsqueeze(-2).expand(S, N, H, R, m1)
    return cand_SNHQ, s_SNHRP.gather(-1, idx_SNHRQ)


def summed_grid(sr_XHRQ: torch.Tensor, sc_XHRQ: torch.Tensor, core_HRR: torch.Tensor | None) -> torch.Tensor:
    """Summed-core bilinear scores of every (row, column) candidate pair: (X..., H, Q, Q)."""
    if core_HRR is None:
        return sr_XHRQ.transpose(-1, -2) + sc_XHRQ  # R = 1: row score + column score
    return sr_XHRQ.transpose(-1, -2) @ (core_HRR.to(sr_XHRQ.dtype) @ sc_XHRQ)


def grid_topm_reference(sr_XHRQ: torch.Tensor, sc_XHRQ: torch.Tensor, core_HRR: torch.Tensor | None,
                        m: int) -> torch.Tensor:
    """Flat indices (X..., H, M) of the m best pairs, best first."""
    return topk_indices(summed_grid(sr_XHRQ, sc_XHRQ, core_HRR).flatten(-2), m, sorted=True)


register("stage1_topk", "reference", stage1_topk_reference, reference=True)
register("grid_topm", "reference", grid_topm_reference, reference=True)


def stage1_topk(q_NSK, keys_SKJ, ut_SHR, m1: int):
    return select("stage1_topk", q_NSK).fn(q_NSK, keys_SKJ, ut_SHR, m1)


def grid_topm(sr_XHRQ, sc_XHRQ, core_HRR, m: int) -> torch.Tensor:
    return select("grid_topm", sr_XHRQ).fn(sr_XHRQ, sc_XHRQ, core_HRR, m)
