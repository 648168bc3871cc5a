"""Tucker-decomposed query-key retrieval (TDQKR) of UltraMem v1, SPEC section 4 steps 1-6.

Shape legend (suffixes on tensor names):
    B batch   T time   D model width   H retrieval heads   R Tucker rank r   C cores h
    P keys scored per side (n' = sqrt(E) * n)   Q stage-1 candidates per side (m1)   M kept (m)
    Dk query/key width per side

The score of virtual slot (a, b) under core c is S_row[:, a]^T C_c S_col[:, b]; slots are ranked
by the sum over cores. Stage 1 keeps the m1 best rows and columns under the rank-1 proxy of the
summed core (its leading singular vectors u, t); stage 2 scores the m1 x m1 surviving pairs
exactly. Ranking runs without gradient: gradients reach queries, keys and cores only through the
per-core scores of the kept slots, which are recomputed with autograd from the gathered rows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import UltraMemConfig


class Retrieved(NamedTuple):
    """indices: (B, T, H, M) int64 virtual slot ids in [0, E*N); scores: (B, T, H, M, C)."""

    indices: torch.Tensor
    scores: torch.Tensor


def _norm(x: torch.Tensor, gain: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "rms":
        return F.rms_norm(x, (x.shape[-1],), gain, eps=1e-6)
    return F.layer_norm(x, (x.shape[-1],), gain, None, eps=1e-6)


def _leading_pair(core_HRR: torch.Tensor, prev_u_HR: torch.Tensor | None, prev_t_HR: torch.Tensor | None):
    """Leading left/right singular vectors per head, signed to stay closest (L1) to the previous pair."""
    U, _, Vh = torch.linalg.svd(core_HRR.detach().float())
    u_HR, t_HR = U[..., :, 0], Vh[..., 0, :]
    if prev_u_HR is None:
        # No history: orient so the proxy favours positive scores (a positive core gives u, t > 0).
        flip_H = (u_HR.sum(-1) + t_HR.sum(-1)) < 0
    else:
        keep_H = (u_HR - prev_u_HR).abs().sum(-1) + (t_HR - prev_t_HR).abs().sum(-1)
        flip_H = (-u_HR - prev_u_HR).abs().sum(-1) + (-t_HR - prev_t_HR).abs().sum(-1) < keep_H
    sign_H1 = torch.where(flip_H, -1.0, 1.0).unsqueeze(-1)
    return u_HR * sign_H1, t_HR * sign_H1


def expected_topm_mean(m1: int, m: int, samples: int = 256, seed: int = 0) -> float:
    """E[Y], Y = mean of the top-m of m1^2 i.i.d. N(0, 1) draws (Monte-Carlo, fixed seed)."""
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randn(samples, m1 * m1, generator=gen)
    return draws.topk(m, dim=-1).values.mean().item()


class TuckerRetrieval(nn.Module):
    """Shared row/column query, normed per-head keys with r rank components, h Tucker cores."""

    def __init__(self, cfg: UltraMemConfig):
        super().__init__()
        self.cfg = cfg
        H, P, R, Dk, C = cfg.heads, cfg.keys_per_side, cfg.tucker_rank, cfg.key_dim, cfg.num_cores
        self.conv = nn.Conv1d(cfg.dim, cfg.dim, 3, groups=cfg.dim, bias=False) if cfg.query_conv else None
        self.w_q = nn.Linear(cfg.dim, 2 * Dk, bias=False)
        self.q_row_norm = nn.Parameter(torch.ones(Dk))
        self.q_col_norm = nn.Parameter(torch.ones(Dk))
        self.keys_row = nn.Parameter(torch.empty(H, P, R, Dk))
        self.keys_col = nn.Parameter(torch.empty(H, P, R, Dk))
        self.k_row_norm = nn.Parameter(torch.ones(Dk))
        self.k_col_norm = nn.Parameter(torch.ones(Dk))
        self.cores = nn.Parameter(torch.empty(H, C, R, R))
        self.register_buffer("u", torch.zeros(H, R))
        self.register_buffer("t", torch.zeros(H, R))
        self._cores_version = -1  # cores._version at the last refresh; forces a refresh on first use
        self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh_tucker(force=True))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg, Dk = self.cfg, self.cfg.key_dim
        nn.init.normal_(self.w_q.weight, std=Dk ** -0.5)
        nn.init.normal_(self.keys_row, std=Dk ** -0.5)
        nn.init.normal_(self.keys_col, std=Dk ** -0.5)
        nn.init.uniform_(self.cores, 0.0, 1.0)
        if cfg.init == "paper":
            q_gain, k_gain = expected_topm_mean(cfg.m1, cfg.topk) ** -0.5, Dk ** -0.5
        else:
            q_gain = k_gain = Dk ** -0.33
        for gain, value in ((self.q_row_norm, q_gain), (self.q_col_norm, q_gain),
                            (self.k_row_norm, k_gain), (self.k_col_norm, k_gain)):
            gain.fill_(value)
        if self.conv is not None:
            self.conv.reset_parameters()
        self.u.zero_()
        self.t.zero_()
        self.refresh_tucker(force=True)

    @torch.no_grad()
    def refresh_tucker(self, force: bool = False) -> None:
        """Recompute the stage-1 singular vectors u, t of the summed cores (fp32 SVD, no gradient)."""
        if not force and self.cores._version == self._cores_version:
            return
        have_prev = bool(self.u.abs().sum() > 0)
        u, t = _leading_pair(self.cores.sum(1), self.u.float() if have_prev else None,
                             self.t.float() if have_prev else None)
        self.u.copy_(u)
        self.t.copy_(t)
        self._cores_version = self.cores._version

    def singular_values(self) -> torch.Tensor:
        """Singular values (H, r) of each head's summed core (differentiable)."""
        return torch.linalg.svdvals(self.cores.sum(1).float())

    def row_col_scores(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """S_row, S_col: (B, T, H, P, R) scores of every key against the shared query."""
        cfg = self.cfg
        if self.conv is not None:
            # Causal: pad two steps on the left so step t sees t-2, t-1, t only.
            x_BDT = F.pad(x_BTD.transpose(1, 2), (2, 0))
            x_BTD = self.conv(x_BDT).transpose(1, 2)
        q_row_BTK, q_col_BTK = self.w_q(x_BTD).chunk(2, dim=-1)
        q_row_BTK = _norm(q_row_BTK, self.q_row_norm, cfg.norm)
        q_col_BTK = _norm(q_col_BTK, self.q_col_norm, cfg.norm)
        k_row = _norm(self.keys_row, self.k_row_norm, cfg.norm)
        k_col = _norm(self.keys_col, self.k_col_norm, cfg.norm)
        B, T, _ = x_BTD.shape
        H, P, R = cfg.heads, cfg.keys_per_side, cfg.tucker_rank
        s_row = (q_row_BTK @ k_row.reshape(-1, cfg.key_dim).T).view(B, T, H, P, R)
        s_col = (q_col_BTK @ k_col.reshape(-1, cfg.key_dim).T).view(B, T, H, P, R)
        return s_row, s_col

    def forward(self, x_BTD: torch.Tensor, exact: bool = False) -> Retrieved:
        if not torch.compiler.is_compiling():
            self.refresh_tucker()
        s_row_BTHPR, s_col_BTHPR = self.row_col_scores(x_BTD)
        if exact:
            row_BTHM, col_BTHM = self._select_exact(s_row_BTHPR, s_col_BTHPR)
        else:
            row_BTHM, col_BTHM = self._select_two_stage(s_row_BTHPR, s_col_BTHPR)
        scores_BTHMC = self._core_scores(s_row_BTHPR, s_col_BTHPR, row_BTHM, col_BTHM)
        return Retrieved(row_BTHM * self.cfg.keys_per_side + col_BTHM, scores_BTHMC)

    @torch.no_grad()
    def _select_two_stage(self, s_row_BTHPR, s_col_BTHPR):
        m1, m = self.cfg.m1, self.cfg.topk
        rho_BTHP = torch.einsum("bthpr,hr->bthp", s_row_BTHPR, self.u.to(s_row_BTHPR.dtype))
        gam_BTHP = torch.einsum("bthpr,hr->bthp", s_col_BTHPR, self.t.to(s_col_BTHPR.dtype))
        cand_row_BTHQ = rho_BTHP.topk(m1, dim=-1).indices
        cand_col_BTHQ = gam_BTHP.topk(m1, dim=-1).indices
        sr_BTHQR = _take(s_row_BTHPR, cand_row_BTHQ)
        sc_BTHQR = _take(s_col_BTHPR, cand_col_BTHQ)
        grid_BTHQQ = self._summed_grid(sr_BTHQR, sc_BTHQR)
        flat_BTHM = grid_BTHQQ.flatten(-2).topk(m, dim=-1).indices
        row_BTHM = cand_row_BTHQ.gather(-1, flat_BTHM // m1)
        col_BTHM = cand_col_BTHQ.gather(-1, flat_BTHM % m1)
        return row_BTHM, col_BTHM

    @torch.no_grad()
    def _select_exact(self, s_row_BTHPR, s_col_BTHPR):
        P = self.cfg.keys_per_side
        grid_BTHPP = self._summed_grid(s_row_BTHPR, s_col_BTHPR)
        flat_BTHM = grid_BTHPP.flatten(-2).topk(self.cfg.topk, dim=-1).indices
        return flat_BTHM // P, flat_BTHM % P

    def _summed_grid(self, sr_BTHQR, sc_BTHQR):
        core_HRR = self.cores.sum(1).to(sr_BTHQR.dtype)
        left_BTHQR = torch.einsum("bthqr,hrs->bthqs", sr_BTHQR, core_HRR)
        return left_BTHQR @ sc_BTHQR.transpose(-1, -2)

    def _core_scores(self, s_row_BTHPR, s_col_BTHPR, row_BTHM, col_BTHM):
        sr_BTHMR = _take(s_row_BTHPR, row_BTHM)
        sc_BTHMR = _take(s_col_BTHPR, col_BTHM)
        return torch.einsum("bthmr,hcrs,bthms->bthmc", sr_BTHMR, self.cores.to(sr_BTHMR.dtype), sc_BTHMR)


def _take(s_BTHPR: torch.Tensor, idx_BTHM: torch.Tensor) -> torch.Tensor:
    """Rows idx of the key axis: (B, T, H, P, R) -> (B, T, H, M, R)."""
    R = s_BTHPR.shape[-1]
    return s_BTHPR.gather(3, idx_BTHM.unsqueeze(-1).expand(*idx_BTHM.shape, R))
