"""The memory layers: `UltraMemLayer` (v1, SPEC section 4) and `PKMLayer` (SPEC section 3).

Both implement `memory.MemoryLayer`; their value tables come from a `TableFactory`.

Shape legend (the package's, see `ultramem/__init__.py`): B batch, T time, D model width, H heads,
M kept per head, C cores (MCS chunks), G value-expansion blocks (E of them), Dv value width,
K = H * M entries per token.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .config import PKMConfig, UltraMemConfig
from .memory import MemoryLayer, Retrieved, TableFactory, default_table_factory
from .retrieval import ConvState, TuckerRetrieval


def _check_input(x: torch.Tensor, dim: int, name: str, training: bool) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != dim:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected input of shape (batch, time, {dim}), got {got}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point input, got dtype {x.dtype}")
    # A NaN/Inf reaching top-k and the optimiser would corrupt keys, cores and values silently;
    # in training we stop before anything is touched (one reduction; skipped under compile).
    if training and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        if not torch.isfinite(x).all():
            raise ValueError(f"{name}: input contains NaN or Inf; refusing to train on it")


def _compute_dtype(x: torch.Tensor, param: torch.Tensor) -> torch.dtype | None:
    """The dtype to cast a floating input to (the layer's own), or None to leave it: an fp16/bf16
    input to an fp32 layer outside autocast runs in the layer's dtype (autocast casts by itself)."""
    if x.dtype == param.dtype or torch.is_autocast_enabled(x.device.type):
        return None
    return param.dtype


def _empty_retrieved(x_BTD: torch.Tensor, heads: int, kept: int, chunks: int) -> Retrieved:
    B, T, _ = x_BTD.shape
    return Retrieved(torch.zeros(B, T, heads, kept, dtype=torch.long, device=x_BTD.device),
                     x_BTD.new_zeros(B, T, heads, kept, chunks))


def checked_forward(name: str):
    """Decorator of a memory layer's `forward(x_BTD, ...)`, the rules every layer shares: the input
    is checked; an empty batch or sequence gives an empty output of the right shape; a
    half-precision input to an fp32 layer (outside autocast) runs in the layer's dtype and the
    output comes back in the input's."""

    def wrap(forward):
        @functools.wraps(forward)
        def checked(self, x_BTD: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            _check_input(x_BTD, self.cfg.dim, name, self.training)
            B, T, _ = x_BTD.shape
            if B * T == 0:
                return x_BTD.new_zeros(B, T, self.cfg.out_dim)
            cast = _compute_dtype(x_BTD, next(self.parameters()))
            if cast is None:
                return forward(self, x_BTD, *args, **kwargs)
            return forward(self, x_BTD.to(cast), *args, **kwargs).to(x_BTD.dtype)
        return checked
    return wrap


def retrieve_tucker(layer, x_BTD: torch.Tensor, exact: bool, name: str) -> Retrieved:
    """`retrieve` of a layer searching with a `TuckerRetrieval` (v1 and v2): checked input, an
    empty result for an empty input, half-precision input in the layer's dtype."""
    cfg = layer.cfg
    _check_input(x_BTD, cfg.dim, f"{name}.retrieve", False)
    if x_BTD.numel() == 0:
        return _empty_retrieved(x_BTD, cfg.heads, cfg.topk, cfg.num_cores)
    cast = _compute_dtype(x_BTD, layer.retrieval.w_q.weight)
    return layer.retrieval(x_BTD if cast is None else x_BTD.to(cast), exact=exact)


def _legacy_state(state, exact: bool, conv_state, name: str):
    """Accept the 0.1 call forms `layer(x, True)` (exact) and `conv_state=` with a warning."""
    if isinstance(state, bool):
        warnings.warn(f"{name}(x, exact) positionally is deprecated; pass exact=True",
                      DeprecationWarning, stacklevel=3)
        state, exact = None, state
    if conv_state is not None:
        warnings.warn(f"{name}(conv_state=...) is deprecated; pass state=... (see new_state())",
                      DeprecationWarning, stacklevel=3)
        state = conv_state
    return state, exact


class UltraMemLayer(MemoryLayer):
    """UltraMem memory layer: TDQKR retrieval, raw scores, MCS, IVE and the merged output linear.

    table_factory builds the value table (default: the in-memory `ValueTable`)."""

    def __init__(self, cfg: UltraMemConfig, table_factory: TableFactory | None = None):
        super().__init__()
        if not isinstance(cfg, UltraMemConfig):
            raise TypeError(f"cfg: expected UltraMemConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.retrieval = TuckerRetrieval(cfg)
        factory = table_factory or default_table_factory
        self.values = factory(cfg.num_values, cfg.v_dim, cfg.num_cores, sparse=cfg.sparse_values,
                              lookup=cfg.lookup)
        self.w_o = nn.Linear(cfg.value_expansion * cfg.v_dim, cfg.out_dim, bias=False)
        self.register_buffer("perm", torch.randperm(cfg.num_virtual))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every tensor (SPEC section 4; cfg.init picks "paper", "authors" or "calibrated").

        - values: N(0, E / (2 m H L)) so the output variance matches a GPT residual branch when
          kept scores are ~1 ("authors": N(0, 0.02^2); cfg.value_init_std, if set, overrides both);
        - W_q and keys: N(0, 1/D_k); cores: U(0, 1);
        - key-norm gains 1/sqrt(D_k); query-norm gains 1/sqrt(E[Y]) with Y the mean of the top-m
          of m1^2 N(0, 1) draws ("authors": both D_k^-0.33; "calibrated": the gain that makes the
          kept per-core scores' RMS 1 on random inputs, measured through the real search);
        - W_o: N(0, 1/(E D_v)); query conv (if any): the identity (current step 1, past 0);
        - perm: a fresh random permutation of the E*N virtual slots (drawn in __init__, kept here).
        """
        cfg = self.cfg
        self.retrieval.reset_parameters()
        if cfg.value_init_std is not None:
            std = cfg.value_init_std
        elif cfg.init in ("paper", "calibrated"):
            std = (cfg.value_expansion / (2 * cfg.topk * cfg.heads * cfg.depth)) ** 0.5
        else:
            std = 0.02
        self.values.init_weights(std)
        nn.init.normal_(self.w_o.weight, std=(cfg.value_expansion * cfg.v_dim) ** -0.5)

    def retrieve(self, x_BTD: torch.Tensor, exact: bool = False) -> Retrieved:
        """Top-m virtual slots per head and their per-core scores (exact=True: brute-force oracle)."""
        return retrieve_tucker(self, x_BTD, exact, "UltraMemLayer")

    def new_state(self) -> ConvState | None:
        """With query_conv, the conv's input history carried between decode steps; else None."""
        return ConvState() if self.cfg.query_conv else None

    @checked_forward("UltraMemLayer")
    def forward(self, x_BTD: torch.Tensor, state: ConvState | None = None, *, exact: bool = False,
                conv_state: ConvState | None = None) -> torch.Tensor:
        """(B, T, D) -> (B, T, D_out). state: from `new_state()`, for step-by-step decoding."""
        state, exact = _legacy_state(state, exact, conv_state, "UltraMemLayer")
        cfg = self.cfg
        B, T, _ = x_BTD.shape
        retrieved = self.retrieval(x_BTD, exact=exact, conv_state=state)
        self._notify_retrieval(retrieved)
        idx_BTHM, scores_BTHMC = retrieved
        if cfg.softmax:  # over each head's m kept slots, one distribution per core
            scores_BTHMC = scores_BTHMC.softmax(dim=3)
        row_TK, block_TK = self.slot_locations(idx_BTHM.reshape(B * T, -1))
        w_TKC = scores_BTHMC.reshape(B * T, -1, cfg.num_cores)
        pooled_TGDv = self.values.pool(row_TK, block_TK, w_TKC, cfg.value_expansion)
        pooled = pooled_TGDv.reshape(B, T, -1).to(self.w_o.weight.dtype)
        return self.w_o(pooled)

    def slot_locations(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """IVE: virtual slot ids -> (physical row, expansion block), each of idx's shape, through
        the fixed permutation (index_select: half the time of advanced indexing at decode sizes)."""
        phys = self.perm.index_select(0, idx.reshape(-1)).view(idx.shape)
        block = torch.div(phys, self.cfg.num_values, rounding_mode="floor")
        return phys - block * self.cfg.num_values, block

    def physical_rows(self, indices: torch.Tensor) -> torch.Tensor:
        return self.slot_locations(indices)[0]

    def index_bytes(self, indices: torch.Tensor) -> int:
        """The `perm` entries of the distinct virtual slots read."""
        return int(torch.unique(indices.reshape(-1)).numel()) * self.perm.element_size()

    def after_optimizer_step(self) -> None:
        """Recompute the stage-1 singular vectors of the changed cores (and drop the key cache)."""
        self.retrieval.refresh_tucker(force=True)

    def refresh_tucker(self) -> None:
        """The same refresh as `after_optimizer_step` (the 0.1 name, kept)."""
        self.after_optimizer_step()

    def aux_loss(self) -> torch.Tensor:
        """alpha/(r-1) * sum over heads and i >= 2 of relu(lambda_i - tau)^2 (zero when disabled)."""
        cfg = self.cfg
        if cfg.core_loss_coef == 0:
            return self.w_o.weight.new_zeros(())
        excess = (self.retrieval.singular_values()[:, 1:] - cfg.core_loss_tau).clamp_min(0)
        return cfg.core_loss_coef / (cfg.tucker_rank - 1) * excess.pow(2).sum()

    def memory_stats(self) -> dict[str, float]:
        return self.retrieval.core_stats()


class PKMLayer(MemoryLayer):
    """Product-key memory: per-head queries and sub-keys, additive grid, softmax over the kept k,
    one value table shared by the heads. Optional Memory+ gate and output projection."""

    def __init__(self, cfg: PKMConfig, table_factory: TableFactory | None = None):
        super().__init__()
        if not isinstance(cfg, PKMConfig):
            raise TypeError(f"cfg: expected PKMConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        H, Dk = cfg.heads, cfg.key_dim
        q_width = Dk if cfg.share_query else H * Dk
        self.w_q = nn.Linear(cfg.dim, q_width, bias=False)
        if cfg.query_norm == "batch":
            self.q_norm = nn.BatchNorm1d(q_width)
        elif cfg.query_norm == "layer":
            self.q_norm = nn.LayerNorm(q_width)
        elif cfg.query_norm == "rms":
            self.q_norm = nn.RMSNorm(q_width)
        else:
            self.q_norm = nn.Identity()
        self.subkeys = nn.Parameter(torch.empty(H, 2, cfg.num_keys, Dk // 2))
        self.key_gain = nn.Parameter(torch.ones(Dk // 2)) if cfg.key_norm else None
        factory = table_factory or default_table_factory
        self.values = factory(cfg.num_values, cfg.v_dim, 1, sparse=cfg.sparse_values, lookup=cfg.lookup)
        self.w_g = nn.Linear(cfg.dim, cfg.v_dim, bias=False) if cfg.memory_plus else None
        needs_proj = cfg.memory_plus or cfg.v_dim != cfg.out_dim
        self.w_o = nn.Linear(cfg.v_dim, cfg.out_dim, bias=False) if needs_proj else None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """W_q, W_g: N(0, 1/D); sub-keys: U(-1/sqrt(Dk/2), 1/sqrt(Dk/2)); values: N(0, value_init_std^2)
        with default std D_v^-0.5 (PKM's choice); W_o: N(0, 1/D_v); query norm: identity; key-norm
        gain (if any): 1/sqrt(Dk/2)."""
        cfg = self.cfg
        nn.init.normal_(self.w_q.weight, std=cfg.dim ** -0.5)
        bound = (cfg.key_dim // 2) ** -0.5
        nn.init.uniform_(self.subkeys, -bound, bound)
        std = cfg.value_init_std if cfg.value_init_std is not None else cfg.v_dim ** -0.5
        self.values.init_weights(std)
        if self.w_g is not None:
            nn.init.normal_(self.w_g.weight, std=cfg.dim ** -0.5)
        if self.w_o is not None:
            nn.init.normal_(self.w_o.weight, std=cfg.v_dim ** -0.5)
        if hasattr(self.q_norm, "reset_parameters"):
            self.q_norm.reset_parameters()
        if self.key_gain is not None:
            self.key_gain.fill_(bound)  # normed keys keep the scale of the uniform init

    def _query(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q = self.q_norm(self.w_q(x_BTD).reshape(B * T, -1))
        if self.cfg.share_query:
            return q.view(B, T, 1, self.cfg.key_dim).expand(B, T, self.cfg.heads, self.cfg.key_dim)
        return q.view(B, T, self.cfg.heads, self.cfg.key_dim)

    def _subkeys(self) -> torch.Tensor:
        if self.key_gain is None:
            return self.subkeys
        return F.rms_norm(self.subkeys, (self.subkeys.shape[-1],), self.key_gain, eps=1e-6)

    def retrieve(self, x_BTD: torch.Tensor, exact: bool = False) -> Retrieved:
        """Top-k slots per head and their scores (B, T, H, k, 1); softmaxed unless cfg.softmax=False.

        exact=True ranks the whole n x n grid (an oracle for tests; the product-key search is exact,
        so both agree up to ties)."""
        _check_input(x_BTD, self.cfg.dim, "PKMLayer.retrieve", False)
        cfg = self.cfg
        if x_BTD.numel() == 0:
            return _empty_retrieved(x_BTD, cfg.heads, cfg.topk, 1)
        cast = _compute_dtype(x_BTD, self.w_q.weight)
        if cast is not None:
            x_BTD = x_BTD.to(cast)
        n, k = cfg.num_keys, cfg.topk
        q1_BTHK, q2_BTHK = self._query(x_BTD).chunk(2, dim=-1)
        keys = self._subkeys()
        s1_BTHN = torch.einsum("bthk,hnk->bthn", q1_BTHK, keys[:, 0])
        s2_BTHN = torch.einsum("bthk,hnk->bthn", q2_BTHK, keys[:, 1])
        if exact:
            grid = (s1_BTHN.unsqueeze(-1) + s2_BTHN.unsqueeze(-2)).flatten(-2)
            best, idx_BTHM = grid.topk(k, dim=-1)
        else:
            v1, i1 = s1_BTHN.topk(k, dim=-1)
            v2, i2 = s2_BTHN.topk(k, dim=-1)
            # The true top-k of the n^2 sums lies in the k x k grid of per-side winners.
            grid = (v1.unsqueeze(-1) + v2.unsqueeze(-2)).flatten(-2)
            best, flat = grid.topk(k, dim=-1)
            idx_BTHM = i1.gather(-1, flat // k) * n + i2.gather(-1, flat % k)
        scores = best.softmax(dim=-1) if cfg.softmax else best
        return Retrieved(idx_BTHM, scores.unsqueeze(-1))

    @checked_forward("PKMLayer")
    def forward(self, x_BTD: torch.Tensor, state=None) -> torch.Tensor:
        """(B, T, D) -> (B, T, D_out); PKM carries no decode state (state is accepted and unused)."""
        cfg = self.cfg
        B, T, _ = x_BTD.shape
        retrieved = self.retrieve(x_BTD)
        self._notify_retrieval(retrieved)
        idx_BTHM, scores_BTHM1 = retrieved
        pooled = self.values.pool(idx_BTHM.reshape(B * T, -1), None, scores_BTHM1.reshape(B * T, -1, 1),
                                  1).view(B, T, cfg.v_dim)
        pooled = pooled.to(x_BTD.dtype)
        if self.w_g is not None:
            pooled = pooled * F.silu(self.w_g(x_BTD))
        return self.w_o(pooled) if self.w_o is not None else pooled

    def aux_loss(self) -> torch.Tensor:
        return self.subkeys.new_zeros(())
