"""The two search stages of TDQKR as ops (torch references here; Triton kernels in `triton_topk.py`).

Shape legend: S the two sides (0 = row, 1 = column), N tokens, Dk query/key width per side,
H heads, R Tucker rank, P keys per side (n'), Q stage-1 candidates (m1), M kept (m),
J = H*R*P key columns per side, in (head, rank, key) order (see `TuckerRetrieval._build_key_matrix`).

- `stage1_topk(q_NSK, keys_SKJ, ut_SHR, m1)`: score every key of both sides against the query,
  rank them by the rank-1 proxy u^T s (row side) / t^T s (column side) and keep the m1 best per
  (side, token, head); returns the candidates' indices and their per-rank scores. The proxy is
  linear in the keys (u^T (q . k_r) = q . (sum_r u_r k_r)), so the CPU path scores one folded
  key per (head, key) (`Stage1Cache`: 1/R of the key bytes and FLOPs) and recomputes the R
  per-rank scores of the m1 winners only; the Triton kernel never writes the score matrix.
- `grid_topm(sr_XHRQ, sc_XHRQ, core_HRR, m)`: the stage-2 grid: summed-core bilinear scores of
  every (row, column) candidate pair, and the flat indices (row * Q + column) of the m best,
  best first. core_HRR None = additive scores (R = 1: row + column).
"""

from __future__ import annotations

import torch

from .dispatch import register, select
from .scoring import score_keys
from .topk import topk_indices


class Stage1Cache:
    """Derived key layouts for `stage1_topk_folded`, rebuilt when the key matrix or (u, t) change.

    folded_SKX: (S, Dk, H*P), sum_r ut[s, h, r] * keys[s, :, (h, r, p)] (the proxy's keys);
    keys_SJK: the key matrix transposed, so a winner's key is one contiguous Dk row to gather.
    The owner (TuckerRetrieval) drops the cache when its parameters change; `get` also checks
    that it is handed the same key tensor (held here, so its memory cannot be reused) and equal
    (u, t)."""

    def __init__(self):
        self.keys_SKJ: torch.Tensor | None = None
        self.ut_SHR: torch.Tensor | None = None
        self.folded_SKX = self.keys_SJK = None

    def get(self, keys_SKJ: torch.Tensor, ut_SHR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys_SKJ is not keys_SKJ or not torch.equal(self.ut_SHR, ut_SHR):
            S, Dk, J = keys_SKJ.shape
            H, R = ut_SHR.shape[1:]
            k_SKHRP = keys_SKJ.view(S, Dk, H, R, J // (H * R))
            ut = ut_SHR.to(keys_SKJ.dtype).view(S, 1, H, R, 1)
            self.folded_SKX = (k_SKHRP * ut).sum(3).reshape(S, Dk, -1)
            self.keys_SJK = keys_SKJ.transpose(1, 2).contiguous()
            self.keys_SKJ, self.ut_SHR = keys_SKJ, ut_SHR.clone()
        return self.folded_SKX, self.keys_SJK


def stage1_topk_folded(q_NSK: torch.Tensor, keys_SKJ: torch.Tensor, ut_SHR: torch.Tensor, m1: int,
                       cache: Stage1Cache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU path: proxy scores against the folded keys, top-m1, then the winners' per-rank scores
    from their gathered key rows (one bmm of (H*R*Q, Dk) rows against each query)."""
    N, S, Dk = q_NSK.shape
    H, R = ut_SHR.shape[1:]
    J = keys_SKJ.shape[-1]
    P = J // (H * R)
    folded_SKX, keys_SJK = (cache or Stage1Cache()).get(keys_SKJ, ut_SHR)
    q_SNK = q_NSK.transpose(0, 1)
    proxy_SNHP = torch.bmm(q_SNK, folded_SKX.to(q_NSK.dtype)).view(S, N, H, P)
    cand_SNHQ = topk_indices(proxy_SNHP, m1, sorted=False)
    # Column of (side s, head h, rank r, key p) in the stacked (S*J, Dk) rows: s*J + (h*R + r)*P + p.
    base_SHR = (torch.arange(S, device=q_NSK.device).view(S, 1, 1) * J
                + torch.arange(H * R, device=q_NSK.device).view(1, H, R) * P)
    col_SNHRQ = cand_SNHQ.unsqueeze(-2) + base_SHR.view(S, 1, H, R, 1)
    rows_SNXK = keys_SJK.view(S * J, Dk).index_select(0, col_SNHRQ.reshape(-1)).view(S, N, -1, Dk)
    # A multiply and a sum: ~4x faster than a batched matrix-vector bmm at these sizes on CPU.
    scores_SNX = (rows_SNXK.to(q_NSK.dtype) * q_SNK.unsqueeze(-2)).sum(-1)
    return cand_SNHQ, scores_SNX.view(S, N, H, R, m1)


def stage1_topk_reference(q_NSK: torch.Tensor, keys_SKJ: torch.Tensor, ut_SHR: torch.Tensor,
                          m1: int, cache: Stage1Cache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
register("stage1_topk", "folded", stage1_topk_folded, accepts=lambda t: t.device.type == "cpu")
register("grid_topm", "reference", grid_topm_reference, reference=True)


def stage1_topk(q_NSK, keys_SKJ, ut_SHR, m1: int, cache: Stage1Cache | None = None):
    """(cand_SNHQ, cand_SNHRQ scores); `cache` keeps the derived key layouts across decode steps."""
    return select("stage1_topk", q_NSK).fn(q_NSK, keys_SKJ, ut_SHR, m1, cache)


def grid_topm(sr_XHRQ, sc_XHRQ, core_HRR, m: int) -> torch.Tensor:
    return select("grid_topm", sr_XHRQ).fn(sr_XHRQ, sc_XHRQ, core_HRR, m)
