"""Tucker-decomposed query-key retrieval (TDQKR) of UltraMem v1, SPEC section 4 steps 1-6.

Shape legend (suffixes on tensor names):
    B batch   T time   D model width   H retrieval heads   R Tucker rank r   C cores h
    P keys scored per side (n' = sqrt(E) * n)   Q stage-1 candidates per side (m1)   M kept (m)
    Dk query/key width per side   S the two sides (0 = row, 1 = column)

The score of virtual slot (a, b) under core c is S_row[:, a]^T C_c S_col[:, b]; slots are ranked
by the sum over cores. Stage 1 keeps the m1 best rows and columns under the rank-1 proxy of the
summed core (its leading singular vectors u, t); stage 2 scores the m1 x m1 surviving pairs
exactly. The proxy's sign is arbitrary (u, t and -u, -t give the same rank-1 core), and a
slot whose row and column proxies are both negative scores as high as one where both are
positive: `topm_search="rank1_both_signs"` keeps m1/2 candidates from each end so neither half is
lost; "rank1" (the SPEC's search) keeps the top end only. Ranking runs without gradient:
gradients reach queries, keys and cores only through the per-core scores of the kept slots,
which are recomputed with autograd from the gathered rows.

Speed (the decode path is latency-bound, see bench/layer_bench.py):
- both sides are scored by one batched matmul against a (S, Dk, H*R*P) key matrix whose columns are
  the normed keys times the query-norm gain (g_q * norm(q) . k == norm(q) . (g_q * k)), laid out
  rank-major so that the stage-1 proxy and the gathers run over contiguous key rows;
- without autograd that key matrix is cached (see `_key_matrix`), so a decode step does not
  re-normalise ~10^6 key weights per call;
- without autograd only the stage-1 winners' per-rank scores are needed (the kept slots are among
  them), so `ops.stage1_topk` ranks keys by the rank-1 proxy alone: on CPU against cached folded
  keys sum_r u_r k_r (1/R of the key bytes and FLOPs; exact maths, other rounding), on CUDA in a
  Triton kernel that never writes the score matrix (chosen by shape: `_search_only`);
- top-k over long rows goes through `ops.topk_indices` (on CPU an exact block-wise selection, about
  2x faster than one `torch.topk` over 1024 entries); the key products through `ops.score_keys`.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .config import UltraMemConfig
from .memory import Retrieved
from .ops.scoring import score_keys
from .ops.search import Stage1Cache, grid_topm, stage1_topk, summed_grid
from .ops.topk import topk_indices


def _norm(x: torch.Tensor, gain: torch.Tensor | None, kind: str) -> torch.Tensor:
    if kind == "rms":
        return F.rms_norm(x, (x.shape[-1],), gain, eps=1e-6)
    return F.layer_norm(x, (x.shape[-1],), gain, None, eps=1e-6)


def _version_of(t: torch.Tensor) -> int | None:
    """In-place version counter of `t`; None for inference tensors, which do not keep one."""
    return None if t.is_inference() else t._version


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


class ConvState:
    """The last two inputs of the causal query conv, kept between decode steps (one per layer)."""

    def __init__(self):
        self.past: torch.Tensor | None = None  # (B, D, 2)


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
        # "additive" (an ablation rung before TDQKR) scores row + column like PKM: no cores at all.
        self.additive = cfg.score == "additive"
        self.cores = None if self.additive else nn.Parameter(torch.empty(H, C, R, R))
        self.register_buffer("u", torch.zeros(H, R))
        self.register_buffer("t", torch.zeros(H, R))
        self._cores_version = -1  # cores._version at the last refresh; forces a refresh on first use
        self._cores_ptr = 0  # cores.data_ptr() then: a copy/.to() makes a new tensor (version 0)
        self._key_cache: tuple[tuple, torch.Tensor] | None = None  # (stamp, key matrix), no-grad only
        self._stage1_cache: Stage1Cache | None = None  # layouts derived from the cached key matrix
        # No-grad search from the stage-1 winners: None = by shape (`_search_only`), True = always,
        # False = never (the full score matrix, the earlier path; `ultramem bench scale --compare`).
        self.search_only: bool | None = None
        self._warned_stale = False
        # A module-level function, not a lambda: the layer must stay picklable (torch.save(layer)).
        self.register_load_state_dict_post_hook(_refresh_after_load)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg, Dk = self.cfg, self.cfg.key_dim
        nn.init.normal_(self.w_q.weight, std=Dk ** -0.5)
        nn.init.normal_(self.keys_row, std=Dk ** -0.5)
        nn.init.normal_(self.keys_col, std=Dk ** -0.5)
        if self.cores is not None:
            nn.init.uniform_(self.cores, 0.0, 1.0)
        if cfg.init == "paper":
            # E[Y] -> 0 as m approaches m1^2 (the mean of nearly all draws): floor it so the gain
            # stays finite (<= 2) instead of blowing up or going complex.
            q_gain, k_gain = max(expected_topm_mean(cfg.m1, cfg.topk), 0.25) ** -0.5, Dk ** -0.5
        elif cfg.init == "calibrated":
            q_gain, k_gain = 1.0, Dk ** -0.5  # q_gain is set from measured kept scores below
        else:
            q_gain = k_gain = Dk ** -0.33
        for gain, value in ((self.q_row_norm, q_gain), (self.q_col_norm, q_gain),
                            (self.k_row_norm, k_gain), (self.k_col_norm, k_gain)):
            gain.fill_(value)
        if self.conv is not None:
            # Identity (the current step's tap 1, the two past taps 0): adding the conv leaves the
            # model unchanged at init. PyTorch's default mixes three steps with random signs per
            # channel, which cost ablation rung 12 dearly (train loss 4.87 against 4.10 without the
            # conv at step 500; EXPERIMENTS.md).
            self.conv.weight.zero_()
            self.conv.weight[..., -1] = 1.0
        self.u.zero_()
        self.t.zero_()
        self.refresh_tucker(force=True)
        if cfg.init == "calibrated":
            # Row and column scores are each linear in the query gain, so a bilinear slot score
            # scales with q_gain^2 (an additive one with q_gain) and ranks the same at any gain:
            # one measurement at gain 1 sets it exactly.
            q_gain = max(self.kept_score_rms(), 1e-3) ** (-1.0 if self.additive else -0.5)
            self.q_row_norm.fill_(q_gain)
            self.q_col_norm.fill_(q_gain)
            self.refresh_tucker(force=True)

    @torch.no_grad()
    def kept_score_rms(self, tokens: int = 512, seed: int = 0) -> float:
        """Root-mean-square of the kept per-core scores for random inputs, through the configured
        search (what the memory output's variance depends on; "calibrated" init sets it to 1).

        The SPEC's E[Y] models a kept score as the best of m1^2 N(0, 1) draws, but the kept slots
        are the best of n'^2 bilinear products of the best rows and columns: at init they score
        several times more (RMS ~4 a core in the main experiments' layers), which is what this
        measures instead. Its own generator, so the global RNG stream (and every other tensor's
        init) is the same as under init="paper"."""
        gen = torch.Generator(device=self.w_q.weight.device).manual_seed(seed)
        x_BTD = torch.randn(1, tokens, self.cfg.dim, generator=gen, device=self.w_q.weight.device,
                            dtype=self.w_q.weight.dtype)
        return self(x_BTD).scores.float().pow(2).mean().sqrt().item()

    def __getstate__(self):
        # The key caches are derived data (and a tensor deepcopy refuses): never part of a copy.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        return {**state, "_key_cache": None, "_stage1_cache": None}

    def _check_fresh(self) -> None:
        """Warn (once) when the cores changed in place since the last refresh.

        The refresh itself happens in one place: `UltraMemLayer.after_optimizer_step()` (the
        trainer calls it after every optimiser step), `refresh_tucker()`, and after
        `load_state_dict`. Forward does not refresh: a fused optimiser updates the cores without
        bumping their version counter, so a lazy check here could never be the mechanism."""
        if self.cores is None or self._warned_stale:
            return
        version = _version_of(self.cores)
        same_tensor = self.cores.data_ptr() == self._cores_ptr
        stale = version is not None and self._cores_version != -1 and version != self._cores_version
        if stale and same_tensor:
            self._warned_stale = True
            warnings.warn("UltraMem: the Tucker cores changed since the last refresh of the stage-1 "
                          "vectors; call layer.after_optimizer_step() (or refresh_tucker()) after each "
                          "optimiser step", RuntimeWarning, stacklevel=4)

    @torch.no_grad()
    def refresh_tucker(self, force: bool = False) -> None:
        """Recompute the stage-1 singular vectors u, t of the summed cores (fp32 SVD, no gradient)."""
        if force:  # once per optimiser step: never trust a cache across updates
            self._key_cache = self._stage1_cache = None
        # Buffers made under inference mode can only be written inside it (they then hold no grad).
        with torch.inference_mode(self.u.is_inference()):
            if self.cores is None:
                if force:  # additive scores rank rows and columns by their own scores
                    self.u.fill_(1.0)
                    self.t.fill_(1.0)
                return
            version = _version_of(self.cores)
            if not force and version is not None and version == self._cores_version:
                return
            have_prev = bool(self.u.abs().sum() > 0)
            u, t = _leading_pair(self.cores.sum(1), self.u.float() if have_prev else None,
                                 self.t.float() if have_prev else None)
            self.u.copy_(u)
            self.t.copy_(t)
            self._cores_version = -1 if version is None else version
            self._cores_ptr = self.cores.data_ptr()

    def singular_values(self) -> torch.Tensor:
        """Singular values (H, r) of each head's summed core (differentiable; ones when additive)."""
        if self.cores is None:
            return self.u.new_ones(self.cfg.heads, 1)
        return torch.linalg.svdvals(self.cores.sum(1).float())

    @torch.no_grad()
    def core_stats(self) -> dict[str, float]:
        """{"core_sv_ratio": mean over heads of sigma_2 / sigma_1} ({} at rank 1): how far the
        summed cores are from rank 1, logged by the trainer for v1 and V2 alike."""
        sv = self.singular_values()
        if sv.shape[-1] < 2:
            return {}
        return {"core_sv_ratio": (sv[:, 1] / sv[:, 0].clamp_min(1e-12)).mean().item()}

    def _build_key_matrix(self) -> torch.Tensor:
        """(S, Dk, H*R*P): normed keys times the query-norm gain, columns in (head, rank, key) order
        (stored transposed: the (Dk, J) operand layout is ~5% faster in the CPU matmul)."""
        cfg = self.cfg
        k_row_HPRK = _norm(self.keys_row, self.k_row_norm * self.q_row_norm, cfg.norm)
        k_col_HPRK = _norm(self.keys_col, self.k_col_norm * self.q_col_norm, cfg.norm)
        keys_SKHRP = torch.stack((k_row_HPRK.permute(3, 0, 2, 1), k_col_HPRK.permute(3, 0, 2, 1)))
        return keys_SKHRP.reshape(2, cfg.key_dim, -1)

    def _key_matrix(self) -> torch.Tensor:
        """The key matrix; cached while autograd is off (decode, eval), rebuilt when a tensor changes.

        The cache is keyed on (version, storage, dtype, device) of the six tensors it is built from,
        so in-place updates under autograd's eye, `load_state_dict`, `.to()` are all noticed. An
        update that hides from the version counter (`p.data.add_`, fused optimisers) is covered by
        the rules that a grad-enabled forward drops the cache and `refresh_tucker(force=True)` (once
        per optimiser step) drops it too.
        """
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            self._key_cache = self._stage1_cache = None
            return self._build_key_matrix()
        params = (self.keys_row, self.keys_col, self.k_row_norm, self.k_col_norm, self.q_row_norm,
                  self.q_col_norm)
        stamp = tuple((_version_of(p), p.data_ptr(), p.dtype, p.device) for p in params)
        if any(s[0] is None for s in stamp):  # inference tensors: changes cannot be seen, never cache
            return self._build_key_matrix()
        if self._key_cache is None or self._key_cache[0] != stamp:
            # Built outside inference mode so the cached tensor is usable in plain no_grad code too.
            with torch.inference_mode(False):
                self._key_cache = (stamp, self._build_key_matrix())
        return self._key_cache[1]

    def _query(self, x_BTD: torch.Tensor, conv_state: ConvState | None = None) -> torch.Tensor:
        """The normed (row | col) query halves of every token: (B*T, S, Dk)."""
        cfg = self.cfg
        if self.conv is not None:
            # Causal: two steps on the left (zeros, or the previous inputs when decoding step by
            # step) so step t sees t-2, t-1, t only.
            x_BDT = x_BTD.transpose(1, 2)
            if conv_state is None:
                x_BDT = F.pad(x_BDT, (2, 0))
            else:
                past_BD2 = conv_state.past
                if past_BD2 is None:
                    past_BD2 = x_BDT.new_zeros(*x_BDT.shape[:2], 2)
                x_BDT = torch.cat((past_BD2.to(x_BDT.dtype), x_BDT), dim=-1)
                conv_state.past = x_BDT[..., -2:].detach()
            x_BTD = self.conv(x_BDT).transpose(1, 2)
        B, T, _ = x_BTD.shape
        q_NSK = self.w_q(x_BTD).reshape(B * T, 2, cfg.key_dim)  # (row | col) halves of W_q x
        return _norm(q_NSK, None, cfg.norm)  # gains live in the key matrix

    def _scores(self, x_BTD: torch.Tensor, conv_state: ConvState | None = None) -> torch.Tensor:
        """Row and column scores of every key against the shared query: (S, B, T, H, R, P)."""
        cfg = self.cfg
        B, T, _ = x_BTD.shape
        s_SNJ = score_keys(self._query(x_BTD, conv_state), self._key_matrix())
        return s_SNJ.view(2, B, T, cfg.heads, cfg.tucker_rank, cfg.keys_per_side)

    def row_col_scores(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """S_row, S_col: (B, T, H, P, R) scores of every key against the shared query (views)."""
        s_SBTHRP = self._scores(x_BTD)
        return s_SBTHRP[0].transpose(-1, -2), s_SBTHRP[1].transpose(-1, -2)

    def forward(self, x_BTD: torch.Tensor, exact: bool = False,
                conv_state: ConvState | None = None) -> Retrieved:
        if not torch.compiler.is_compiling():
            self._check_fresh()
        if self._search_only(exact, x_BTD.shape[0] * x_BTD.shape[1]):
            return self._forward_search_only(x_BTD, conv_state)
        s_SBTHRP = self._scores(x_BTD, conv_state)
        if exact or self.cfg.topm_search == "exact":
            row_BTHM, col_BTHM = self._select_exact(s_SBTHRP)
        else:
            row_BTHM, col_BTHM = self._select_two_stage(s_SBTHRP)
        idx_SBTHM = torch.stack((row_BTHM, col_BTHM))
        kept_SBTHRM = s_SBTHRP.gather(-1, _expand_rank(idx_SBTHM, s_SBTHRP.shape[-2]))
        scores_BTHMC = self._core_scores(kept_SBTHRM)
        return Retrieved(row_BTHM * self.cfg.keys_per_side + col_BTHM, scores_BTHMC)

    def _search_only(self, exact: bool, tokens: int) -> bool:
        """Without autograd the per-rank scores are needed for the stage-1 winners only, so the
        (S, N, J) score matrix need not be built (`ops.stage1_topk`): decode and eval.

        It saves (R-1)/R of the key products and costs gathering S*H*R*m1 key rows per token: a
        win at small batches (memory-bound: half the key bytes) and for long key rows: at B = 64
        it was 1.18x faster at 20M values (n' = 4,472) but 0.8-1.05x at 5M (n' = 2,236) and 1M
        (CPU, 1 thread, `ultramem bench scale --compare`), hence the rule by shape."""
        if exact or self.cfg.topm_search != "rank1" or torch.is_grad_enabled():
            return False
        if torch.compiler.is_compiling():
            return False
        if self.search_only is not None:
            return self.search_only
        return tokens <= 8 or self.cfg.keys_per_side >= 96 * self.cfg.m1

    def _forward_search_only(self, x_BTD: torch.Tensor, conv_state: ConvState | None) -> Retrieved:
        """The two-stage search from the stage-1 winners' scores alone (same maths as forward)."""
        cfg, (B, T, _) = self.cfg, x_BTD.shape
        m1, H = cfg.m1, cfg.heads
        if self._stage1_cache is None:
            self._stage1_cache = Stage1Cache()
        ut_SHR = torch.stack((self.u, self.t))
        cand_SNHQ, cand_SNHRQ = stage1_topk(self._query(x_BTD, conv_state), self._key_matrix(), ut_SHR,
                                            m1, self._stage1_cache)
        core_HRR = None if self.cores is None else self.cores.sum(1)
        flat_NHM = grid_topm(cand_SNHRQ[0], cand_SNHRQ[1], core_HRR, cfg.topk)
        pos_SNHM = torch.stack((flat_NHM // m1, flat_NHM % m1))
        idx_SNHM = cand_SNHQ.gather(-1, pos_SNHM)
        kept_SNHRM = cand_SNHRQ.gather(-1, _expand_rank(pos_SNHM, cand_SNHRQ.shape[-2]))
        scores_NHMC = self._core_scores(kept_SNHRM)
        idx_NHM = idx_SNHM[0] * cfg.keys_per_side + idx_SNHM[1]
        return Retrieved(idx_NHM.view(B, T, H, -1), scores_NHMC.view(B, T, H, cfg.topk, -1))

    @torch.no_grad()
    def _select_two_stage(self, s_SBTHRP):
        m1, m = self.cfg.m1, self.cfg.topk
        # Rank-1 proxies rho = u^T S_row and gamma = t^T S_col, both sides in one batched product.
        ut_SH1R = torch.stack((self.u, self.t)).unsqueeze(-2).to(s_SBTHRP.dtype)
        proxy_SBTHP = (ut_SH1R[:, None, None] @ s_SBTHRP).squeeze(-2)
        if self.cfg.topm_search == "rank1_both_signs":
            # Both ends of each proxy: the product rho * gamma is large when both are large or
            # both very negative. The top end is masked before taking the bottom one, so the two
            # halves never share an index (ties included) and the grid has no duplicate pairs.
            hi_SBTHQ = topk_indices(proxy_SBTHP, m1 - m1 // 2, sorted=False)
            masked_SBTHP = proxy_SBTHP.scatter(-1, hi_SBTHQ, float("inf"))
            lo_SBTHQ = topk_indices(-masked_SBTHP, m1 // 2, sorted=False)
            cand_SBTHQ = torch.cat((hi_SBTHQ, lo_SBTHQ), dim=-1)
        else:
            cand_SBTHQ = topk_indices(proxy_SBTHP, m1, sorted=False)
        cand_SBTHRQ = s_SBTHRP.gather(-1, _expand_rank(cand_SBTHQ, s_SBTHRP.shape[-2]))
        core_HRR = None if self.cores is None else self.cores.sum(1)
        flat_BTHM = grid_topm(cand_SBTHRQ[0], cand_SBTHRQ[1], core_HRR, m)
        row_BTHM = cand_SBTHQ[0].gather(-1, flat_BTHM // m1)
        col_BTHM = cand_SBTHQ[1].gather(-1, flat_BTHM % m1)
        return row_BTHM, col_BTHM

    @torch.no_grad()
    def _select_exact(self, s_SBTHRP):
        P = self.cfg.keys_per_side
        core_HRR = None if self.cores is None else self.cores.sum(1)
        grid_BTHPP = summed_grid(s_SBTHRP[0], s_SBTHRP[1], core_HRR)
        flat_BTHM = grid_BTHPP.flatten(-2).topk(self.cfg.topk, dim=-1).indices
        return flat_BTHM // P, flat_BTHM % P

    def _core_scores(self, kept_SBTHRM):
        """Per-core scores of the kept slots from their (S, ..., R, M) row/column scores, with
        autograd: (..., M, C)."""
        if self.cores is None:
            return (kept_SBTHRM[0] + kept_SBTHRM[1]).transpose(-1, -2)  # (B, T, H, M, 1)
        # score[m, c] = sum_rs row[r, m] C_c[r, s] col[s, m]: the (r, s) outer products of the kept
        # slots times the flattened cores, one batched matmul (an einsum of three is ~15% slower).
        outer_BTHXM = (kept_SBTHRM[0].unsqueeze(-2) * kept_SBTHRM[1].unsqueeze(-3)).flatten(-3, -2)
        cores_HCX = self.cores.to(outer_BTHXM.dtype).flatten(-2)
        return (cores_HCX @ outer_BTHXM).transpose(-1, -2)


def _expand_rank(idx_XQ: torch.Tensor, R: int) -> torch.Tensor:
    """Key indices (..., Q) -> (..., R, Q), to gather the same keys from every rank component."""
    return idx_XQ.unsqueeze(-2).expand(*idx_XQ.shape[:-1], R, idx_XQ.shape[-1])


def _refresh_after_load(module: TuckerRetrieval, _incompatible_keys) -> None:
    module.refresh_tucker(force=True)
