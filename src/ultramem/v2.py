"""UltraMemV2 (Huang et al. 2025, arXiv 2508.18756; SPEC section 5): the second-generation layer.

What differs from v1 (`layers.UltraMemLayer`):
- one retrieval head with doubled D_k and m (defaults key_dim=256, topk=64, heads=1);
- separate queries per Tucker rank: W_q: D -> 2 * r * D_k, and rank component j of the row (col)
  keys is scored against the row (col) query of rank j (`query_per_rank=False`: v1's one query);
- PEER-style values: slot i has a pre-value P_i (D_p) and a value V_i (D_v); its weight is
  s_i * <P_i, W_pre x> (`pre_value_act="gelu"`: the code's optional activation on <P_i, W_pre x>);
  output W_o(sum_i weight_i V_i), one output projector; D_p : D_v = 1 : 3 by default;
- key expansion independent of value expansion: n' = key_expansion * n keys per side address
  key_expansion^2 virtual copies of the table; `value_expansion` = 1 pools every copy into one
  bag (W_o: D_v -> D), = key_expansion^2 keeps v1's IVE blocks (W_o: E * D_v -> D);
- no core loss (`aux_loss` is 0), no query conv, no decode state;
- value pools (the value and the pre-value tables) shared by groups of `share_group` consecutive
  layers (one table object, several readers: gradients sum, counted once), or the authors'
  code's sliding windows (`share_ratio`): one table of depth * n^2 rows, layer l reading the
  window of share_ratio * depth * n^2 rows that starts at row l * n^2 (wrapping);
- the init matches the memory's output variance to the FFN branch beside it (see `init_std`).

Where SPEC, paper and the authors' code (olmo/ultramem_layer_v2.py) differ:
- per-rank queries: the code computes W_q x for every rank but its (non-NPU) scoring reads the
  row query's two rank slices as the row and column queries of every rank, and its NPU path uses
  rank 0 of each side for all ranks; we follow the paper (rank j's query scores rank j's keys) and
  offer v1's shared query as `query_per_rank=False`;
- sigma_s: the code estimates it from a synthetic stand-in (top-1 of rank-summed scores times the
  mean core entry 0.5); we measure the kept per-core scores through this layer's own search on
  random unit-variance input at construction (logged), which is what the output variance sees;
- sigma_V: SPEC/paper's sigma_V^4 = 0.2 k_inner D / (m H (1 + sigma_s^2) D_p D_v L) (the paper
  prints sigma_V^2; the algebra needs the fourth power, as the code has it) targets an OLMo-style
  FFN; `init="paper"` uses it as printed. The default `init="ffn"` solves the same balance
  (output variance = (m H / E_v) E[s^2] E[a(<P, z>)^2] sigma_V^2) for the variance of this
  library's SwiGLU branch at its own init (w_in N(0, std^2), w_down N(0, std^2 / (2 L))), so the
  memory and FFN outputs start equal (tests/test_v2.py checks it to 20%);
- norm gains D_k^-0.4 on queries and keys, as the code (v1 code: D_k^-0.33); LayerNorm as the code
  (`norm="rms"` available); W_q, keys N(0, 1/D_k), W_pre N(0, 1/D), cores U(0, 1), as the code;
  W_o N(0, 1/(E_v D_v)) (the code's fallback; with its model inits it scales W_o per layer).

Shape suffixes follow the package legend (ultramem/__init__.py); local: Dp pre-value width D_p,
G bags (E_v: 1, or v1's IVE blocks), W (side, rank) query slices.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from .confbase import ConfigBase, fail, param
from .config import LookupKind, NormKind, SearchKind
from .layers import checked_forward, retrieve_tucker
from .memory import MemoryLayer, Retrieved, TableFactory, default_table_factory
from .ops.scoring import score_keys
from .retrieval import TuckerRetrieval

logger = logging.getLogger(__name__)

V2InitKind = Literal["ffn", "paper"]
PreValueAct = Literal["none", "gelu"]
V2_INIT_KINDS, PRE_VALUE_ACTS = get_args(V2InitKind), get_args(PreValueAct)


@dataclass(frozen=True)
class UltraMemV2Config(ConfigBase):
    """One UltraMemV2 memory layer (SPEC section 5; see the module doc for every choice).

    n = num_keys: the table of one pool has n^2 rows; n' = key_expansion * n keys are scored per
    side (with `share_ratio`, n is replaced by the window's side, see `window_keys`).
    """

    dim: int = param(doc="input width D", ge=1)
    num_keys: int = param(128, "n: one pool holds n^2 rows (with `share_ratio`: depth * n^2)", ge=1)
    key_dim: int = param(256, "D_k, query/key width per side (v1's 128, doubled)", ge=1)
    heads: int = param(1, "retrieval heads (V2: one)", ge=1)
    topk: int = param(64, "m values kept per head (v1's 32, doubled)", ge=1)
    stage1_topk: int | None = param(None, "m1 rows and columns kept by stage 1 (null: `min(topk, 128, n')`)",
                                    ge=1)
    topm_search: SearchKind = param("rank1", "as UltraMemConfig.topm_search")
    tucker_rank: int = param(2, "r, rank components of every key (one query each)", ge=1)
    num_cores: int = param(2, "h Tucker cores = MCS chunks of a value row", ge=1)
    key_expansion: int = param(2, "n' = key_expansion * n keys per side; key_expansion^2 virtual copies "
                               "of every row", ge=1)
    value_expansion: int = param(1, "E_v bags: 1 (all virtual copies pooled together) or key_expansion^2 "
                                 "(v1's IVE blocks, W_o: E_v D_v -> D)", ge=1)
    value_dim: int | None = param(None, "D_v (null: `dim // 2`)", ge=1)
    pre_value_dim: int | None = param(None, "D_p of the pre-values (null: `max(1, D_v // 3)`)", ge=1)
    pre_value_act: PreValueAct = param("none", "`none` (paper) or `gelu` (the code's option) on "
                                       "<P_i, W_pre x>")
    query_per_rank: bool = param(True, "a query per Tucker rank (false: v1's one query per side)")
    norm: NormKind = param("layer", "query/key norm: `layer` (the code's) or `rms`")
    dim_out: int | None = param(None, "output width (null: `dim`)", ge=1)
    depth: int = param(1, "L blocks (= memory layers in an LM); used by the init and the windows", ge=1)
    ffn_hidden: int | None = param(None, "width of the FFN beside it, for the init (null: 8/3 dim as "
                                   "LMConfig; an LM sets it)", ge=1)
    ffn_init_std: float = param(0.02, "that FFN's init std (LanguageModel.init_weights)", gt=0)
    init: V2InitKind = param("ffn", "`ffn` (output variance = this library's FFN branch's) or `paper` "
                             "(SPEC's sigma_V formula as printed)")
    value_init_std: float | None = param(None, "overrides sigma_V of both tables", gt=0)
    share_group: int = param(6, "consecutive layers reading one pool (`build_layers`; ignored with "
                             "`share_ratio`)", ge=1)
    share_ratio: float | None = param(None, "the code's sliding windows: one depth * n^2-row pool, "
                                      "each layer reading share_ratio of it", gt=0, le=1)
    lookup: LookupKind = param("fused", "`fused` or `reference` (as in UltraMemConfig)")
    sparse_values: bool = param(False, "row-sparse value and pre-value gradients")

    def validate(self):
        if self.value_expansion not in (1, self.key_expansion ** 2):
            fail("value_expansion", f"must be 1 or key_expansion^2={self.key_expansion ** 2}",
                 self.value_expansion)
        if self.v_dim % self.num_cores:
            fail("value_dim", f"must be divisible by num_cores={self.num_cores}", self.v_dim)
        P = self.keys_per_side
        if self.stage1_topk is not None and self.stage1_topk > P:
            fail("stage1_topk", f"must be <= keys scored per side n'={P}", self.stage1_topk)
        if self.m1 * self.m1 < self.topk:
            fail("topk", f"must be <= stage1_topk^2={self.m1 * self.m1} (the stage-2 grid)", self.topk)
        if self.topk > P * P:
            fail("topk", f"must be <= the virtual grid n'^2={P * P}", self.topk)
        if self.topm_search == "rank1_both_signs" and self.m1 < 2:
            fail("topm_search", "'rank1_both_signs' needs stage1_topk >= 2", self.topm_search)

    # -- derived sizes ----------------------------------------------------------------------
    @property
    def v_dim(self) -> int:
        return self.value_dim if self.value_dim is not None else max(1, self.dim // 2)

    @property
    def p_dim(self) -> int:
        return self.pre_value_dim if self.pre_value_dim is not None else max(1, self.v_dim // 3)

    @property
    def out_dim(self) -> int:
        return self.dim_out if self.dim_out is not None else self.dim

    @property
    def ffn_width(self) -> int:
        return self.ffn_hidden if self.ffn_hidden is not None else 8 * math.ceil(8 * self.dim / 3 / 8)

    @property
    def window_keys(self) -> int:
        """Side of the table one layer addresses: n, or sqrt(share_ratio * depth * n^2) (code's windows)."""
        if self.share_ratio is None:
            return self.num_keys
        return max(1, math.isqrt(int(self.share_ratio * self.depth * self.num_keys ** 2)))

    @property
    def window_rows(self) -> int:
        return self.window_keys ** 2

    @property
    def table_rows(self) -> int:
        """Rows of one pool: n^2 (groups), or depth * n^2 (one model-wide table with windows)."""
        return self.num_keys ** 2 * (self.depth if self.share_ratio is not None else 1)

    @property
    def keys_per_side(self) -> int:
        return self.key_expansion * self.window_keys

    @property
    def num_virtual(self) -> int:
        return self.keys_per_side ** 2

    @property
    def m1(self) -> int:
        if self.stage1_topk is not None:
            return self.stage1_topk
        return min(self.topk, 128, self.keys_per_side)

    # what TuckerRetrieval reads besides the fields above
    score = "tucker"
    query_conv = False


def memory_flops_per_token(cfg: UltraMemV2Config) -> int:
    """Forward FLOPs (multiply-add = 2) of one V2 layer per token: W_q, every key, W_pre, the kept
    pre-value dots and value rows, W_o (top-k and stage 2 not counted, as in counting.py)."""
    q_width = 2 * cfg.key_dim * (cfg.tucker_rank if cfg.query_per_rank else 1)
    keys = cfg.heads * 2 * cfg.keys_per_side * cfg.tucker_rank * cfg.key_dim
    rows = cfg.heads * cfg.topk * (cfg.v_dim + cfg.p_dim)
    return 2 * (cfg.dim * q_width + keys + cfg.dim * cfg.p_dim + rows
                + cfg.value_expansion * cfg.v_dim * cfg.out_dim)


def ffn_hidden_for_ratio(memory: dict, dim: int, depth: int, ratio: float) -> int:
    """SwiGLU width that makes the V2 memory `ratio` of (memory + FFN) forward FLOPs per token
    (the paper's memory ~17%); `memory` holds UltraMemV2Config fields (dim, depth are set here)."""
    fields = {k: v for k, v in memory.items() if k not in ("dim", "depth")}
    mem = memory_flops_per_token(UltraMemV2Config.from_dict({**fields, "dim": dim, "depth": depth}))
    return max(1, round(mem * (1 - ratio) / ratio / (2 * 3 * dim)))


def _norm(x: torch.Tensor, gain: torch.Tensor | None, kind: str) -> torch.Tensor:
    if kind == "rms":
        return F.rms_norm(x, (x.shape[-1],), gain, eps=1e-6)
    return F.layer_norm(x, (x.shape[-1],), gain, None, eps=1e-6)


class V2Retrieval(TuckerRetrieval):
    """TDQKR with one query per (side, Tucker rank); the two-stage search, stage-1 refresh and
    per-core stage-2 scores are v1's (`TuckerRetrieval`), unchanged."""

    def __init__(self, cfg: UltraMemV2Config):
        super().__init__(cfg)
        if cfg.query_per_rank:
            self.w_q = nn.Linear(cfg.dim, 2 * cfg.tucker_rank * cfg.key_dim, bias=False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """W_q, keys N(0, 1/D_k); cores U(0, 1); all four norm gains D_k^-0.4 (the code's init)."""
        Dk = self.cfg.key_dim
        for w in (self.w_q.weight, self.keys_row, self.keys_col):
            nn.init.normal_(w, std=Dk ** -0.5)
        nn.init.uniform_(self.cores, 0.0, 1.0)
        for gain in (self.q_row_norm, self.q_col_norm, self.k_row_norm, self.k_col_norm):
            gain.fill_(Dk ** -0.4)
        self.u.zero_()
        self.t.zero_()
        self.refresh_tucker(force=True)

    def _build_key_matrix(self) -> torch.Tensor:
        """(2R, Dk, H*P): per (side, rank) the normed keys times the query gain (shared query: v1's)."""
        if not self.cfg.query_per_rank:
            return super()._build_key_matrix()
        cfg = self.cfg
        k_row_HPRDk = _norm(self.keys_row, self.k_row_norm * self.q_row_norm, cfg.norm)
        k_col_HPRDk = _norm(self.keys_col, self.k_col_norm * self.q_col_norm, cfg.norm)
        keys_SRDkHP = torch.stack((k_row_HPRDk.permute(2, 3, 0, 1), k_col_HPRDk.permute(2, 3, 0, 1)))
        return keys_SRDkHP.reshape(2 * cfg.tucker_rank, cfg.key_dim, -1)

    def _key_matrix(self) -> torch.Tensor:
        """The parent's cached key matrix, kept detached: the parent builds it under
        `inference_mode(False)`, which turns grad mode back on inside `no_grad`, so the cached
        tensor would otherwise carry an autograd graph back to the keys."""
        km = super()._key_matrix()
        if self._key_cache is not None and self._key_cache[1].requires_grad:
            self._key_cache = (self._key_cache[0], self._key_cache[1].detach())
            km = self._key_cache[1]
        return km

    def _search_only(self, exact: bool, tokens: int) -> bool:
        """The parent's no-grad search from folded rank-1 proxy keys assumes one query per side;
        with a query per rank it would need the ranks' queries folded too, so V2 keeps the full
        two-stage search there (`query_per_rank=False` takes the parent's path)."""
        return False if self.cfg.query_per_rank else super()._search_only(exact, tokens)

    def _scores(self, x_BTD: torch.Tensor, conv_state=None) -> torch.Tensor:
        """Scores of every key (S, B, T, H, R, P); rank j's keys against rank j's query."""
        if not self.cfg.query_per_rank:
            return super()._scores(x_BTD, conv_state)
        cfg = self.cfg
        B, T, _ = x_BTD.shape
        R, H, P = cfg.tucker_rank, cfg.heads, cfg.keys_per_side
        q_TWDk = _norm(self.w_q(x_BTD).reshape(B * T, 2 * R, cfg.key_dim), None, cfg.norm)
        s_WTJ = score_keys(q_TWDk, self._key_matrix())  # W = (side, rank), J = (head, key)
        return s_WTJ.view(2, R, B, T, H, P).permute(0, 2, 3, 4, 1, 5)


def gather_rows(table: nn.Module, row_TK: torch.Tensor) -> torch.Tensor:
    """Rows (T, K, dim) of `table`: its `gather` when it has one, else through `pool` with one bag
    per kept entry (any table implementing the `pool` protocol serves pre-values that way)."""
    if hasattr(table, "gather"):
        return table.gather(row_TK)
    T, K = row_TK.shape
    bag_TK = torch.arange(K, device=row_TK.device).expand(T, K)
    ones_TKC = torch.ones(T, K, table.num_chunks, device=row_TK.device)
    return table.pool(row_TK, bag_TK, ones_TKC, K)


def peer_weights(pre_table: nn.Module, row_TK: torch.Tensor, z_TDp: torch.Tensor, s_TKC: torch.Tensor,
                 act: str = "none") -> torch.Tensor:
    """Per-slot, per-chunk weights s_i * a(<P_i, z>) (T, K, C): K x D_p pre-value rows per token,
    one batched dot with z = W_pre x (no (T, K, D_v) tensor is built)."""
    pre_TKDp = gather_rows(pre_table, row_TK).to(z_TDp.dtype)
    pre_TK = torch.bmm(pre_TKDp, z_TDp.unsqueeze(-1)).squeeze(-1)
    if act == "gelu":
        pre_TK = F.gelu(pre_TK)
    return s_TKC * pre_TK.unsqueeze(-1).to(s_TKC.dtype)


def peer_reference(values_NDv: torch.Tensor, pre_NDp: torch.Tensor, row_TK: torch.Tensor,
                   bag_TK: torch.Tensor | None, s_TKC: torch.Tensor, z_TDp: torch.Tensor, num_bags: int,
                   act: str = "none") -> torch.Tensor:
    """The oracle of V2's pooling: gather full rows of both tables, weight, sum per bag -> (T, G, Dv)."""
    T, K, C = s_TKC.shape
    pre_TK = torch.einsum("tkd,td->tk", pre_NDp[row_TK], z_TDp)
    if act == "gelu":
        pre_TK = F.gelu(pre_TK)
    vals_TKCDv = values_NDv[row_TK].view(T, K, C, -1)
    weighted_TKCDv = vals_TKCDv * (s_TKC * pre_TK.unsqueeze(-1)).unsqueeze(-1)
    bag_TK = torch.zeros_like(row_TK) if bag_TK is None else bag_TK
    onehot_TKG = F.one_hot(bag_TK, num_bags).to(weighted_TKCDv.dtype)
    return torch.einsum("tkg,tkcd->tgcd", onehot_TKG, weighted_TKCDv).reshape(T, num_bags, -1)


def ffn_branch_variance(dim: int, hidden: int, depth: int, std: float = 0.02) -> float:
    """Output variance of this library's SwiGLU at init on unit-variance input: gate and up
    pre-activations ~ N(0, D std^2), w_down N(0, std^2 / (2 L)): H std_out^2 E[silu(a)^2] D std^2."""
    v = dim * std * std
    return hidden * std * std / (2 * depth) * _second_moment(F.silu, v) * v


def _second_moment(fn, var: float) -> float:
    """E[fn(a)^2], a ~ N(0, var), by quadrature on a fine grid (deterministic, ~1e-6 relative)."""
    a = torch.linspace(-10, 10, 8001, dtype=torch.float64)
    w = torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi) * (a[1] - a[0])
    return float((fn(a * math.sqrt(var)) ** 2 * w).sum())


def solve_value_std(target_var: float, kept: int, bags: int, mean_sq_score: float, p_dim: int,
                    act: str = "none") -> float:
    """sigma_V with (K / E_v) E[s^2] E[a(<P, z>)^2] sigma_V^2 = target, <P, z> ~ N(0, D_p sigma_V^2)
    (z = W_pre x has unit-variance entries; W_o ~ N(0, 1/(E_v D_v)) keeps the pooled variance).
    Without activation this is the SPEC's fourth-power formula; with GELU, bisection in log space."""
    scale = kept / bags * mean_sq_score
    if act == "none":
        return (target_var / (scale * p_dim)) ** 0.25
    lo, hi = -30.0, 10.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        sigma = math.exp(mid)
        var = scale * _second_moment(F.gelu, p_dim * sigma * sigma) * sigma * sigma
        lo, hi = (mid, hi) if var < target_var else (lo, mid)
    return math.exp(0.5 * (lo + hi))


class UltraMemV2Layer(MemoryLayer):
    """UltraMemV2 memory layer: V2 retrieval, PEER pre-value weights, pooled values, one W_o.

    table_factory builds the value and pre-value tables (default `ValueTable`). shared: another
    V2 layer whose tables this layer reads too (the same objects, registered in both layers:
    gradients sum, `counting` counts them once; build an LM's layers with `build_layers`).
    layer_index: this layer's window offset with `share_ratio` (row layer_index * n^2).
    """

    def __init__(self, cfg: UltraMemV2Config, table_factory: TableFactory | None = None, *,
                 shared: UltraMemV2Layer | None = None, layer_index: int = 0):
        super().__init__()
        if not isinstance(cfg, UltraMemV2Config):
            raise TypeError(f"cfg: expected UltraMemV2Config, got {type(cfg).__name__}")
        if isinstance(layer_index, bool) or not isinstance(layer_index, int) or layer_index < 0:
            fail("layer_index", "must be an int >= 0", layer_index)
        self.cfg = cfg
        self.layer_index = layer_index
        self.retrieval = V2Retrieval(cfg)
        self.w_pre = nn.Linear(cfg.dim, cfg.p_dim, bias=False)
        self.w_o = nn.Linear(cfg.value_expansion * cfg.v_dim, cfg.out_dim, bias=False)
        self.register_buffer("perm", torch.randperm(cfg.num_virtual))
        self.owns_tables = shared is None
        if shared is None:
            factory = table_factory or default_table_factory
            self.values = factory(cfg.table_rows, cfg.v_dim, cfg.num_cores, sparse=cfg.sparse_values,
                                  lookup=cfg.lookup)
            self.pre_values = factory(cfg.table_rows, cfg.p_dim, 1, sparse=cfg.sparse_values,
                                      lookup=cfg.lookup)
        else:
            self._check_shareable(shared)
            self.values, self.pre_values = shared.values, shared.pre_values
        self.value_std: float | None = None
        self.init_weights()

    def _check_shareable(self, other: UltraMemV2Layer) -> None:
        if not isinstance(other, UltraMemV2Layer):
            raise TypeError(f"shared: expected UltraMemV2Layer, got {type(other).__name__}")
        mine = (self.cfg.table_rows, self.cfg.v_dim, self.cfg.p_dim, self.cfg.num_cores)
        theirs = (other.values.num_rows, other.values.dim, other.pre_values.dim, other.values.num_chunks)
        if mine != theirs:
            fail("shared", f"tables must have (rows, D_v, D_p, chunks)={mine}", theirs)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Retrieval as the code (D_k^-0.4 gains), W_pre N(0, 1/D), W_o N(0, 1/(E_v D_v)), then
        sigma_s measured through this layer's search and sigma_V from it (module doc). A layer that
        reads a shared pool leaves the tables to their owner."""
        cfg = self.cfg
        self.retrieval.reset_parameters()
        nn.init.normal_(self.w_pre.weight, std=cfg.dim ** -0.5)
        nn.init.normal_(self.w_o.weight, std=(cfg.value_expansion * cfg.v_dim) ** -0.5)
        self.value_std = self.init_std()
        if self.owns_tables:
            self.values.init_weights(self.value_std)
            self.pre_values.init_weights(self.value_std)

    @torch.no_grad()
    def kept_score_stats(self, tokens: int = 1024, seed: int = 0) -> tuple[float, float]:
        """(mean, std) of the kept per-core scores on random unit-variance input, through the real
        search (its own generator: the global RNG stream is not consumed)."""
        w = self.retrieval.w_q.weight
        gen = torch.Generator(device=w.device).manual_seed(seed)
        x = torch.randn(1, tokens, self.cfg.dim, generator=gen, device=w.device, dtype=w.dtype)
        s = self.retrieval(x).scores.double()
        return s.mean().item(), s.std().item()

    def init_std(self) -> float:
        """sigma_V of both tables (cfg.value_init_std overrides; the estimate is logged)."""
        cfg = self.cfg
        mean, std = self.kept_score_stats()
        sigma_s = std / max(abs(mean), 1e-12)
        kept = cfg.heads * cfg.topk
        target = ffn_branch_variance(cfg.dim, cfg.ffn_width, cfg.depth, cfg.ffn_init_std)
        if cfg.value_init_std is not None:
            value_std = cfg.value_init_std
        elif cfg.init == "paper":
            k_inner = cfg.ffn_width / cfg.dim
            value_std = (0.2 * k_inner * cfg.dim / (kept * (1 + sigma_s ** 2) * cfg.p_dim * cfg.v_dim
                                                     * cfg.depth)) ** 0.25
        else:
            value_std = solve_value_std(target, kept, cfg.value_expansion, mean * mean + std * std,
                                        cfg.p_dim, cfg.pre_value_act)
        logger.info("UltraMemV2 init (layer %d): kept scores mean %.4g std %.4g (sigma_s %.4g), "
                    "FFN branch variance %.4g, sigma_V %.4g (init=%s)", self.layer_index, mean, std,
                    sigma_s, target, value_std, cfg.init)
        return value_std

    def retrieve(self, x_BTD: torch.Tensor, exact: bool = False) -> Retrieved:
        """The kept virtual slots (B, T, H, M) and per-core scores (B, T, H, M, C)."""
        return retrieve_tucker(self, x_BTD, exact, "UltraMemV2Layer")

    @checked_forward("UltraMemV2Layer")
    def forward(self, x_BTD: torch.Tensor, state=None, *, exact: bool = False) -> torch.Tensor:
        """(B, T, D) -> (B, T, D_out). V2 carries no decode state (state is accepted, unused)."""
        cfg = self.cfg
        B, T, _ = x_BTD.shape
        retrieved = self.retrieval(x_BTD, exact=exact)
        self._notify_retrieval(retrieved)
        idx_BTHM, s_BTHMC = retrieved
        row_TK, bag_TK = self.slot_locations(idx_BTHM.reshape(B * T, -1))
        z_TDp = self.w_pre(x_BTD).reshape(B * T, cfg.p_dim)
        w_TKC = peer_weights(self.pre_values, row_TK, z_TDp, s_BTHMC.reshape(B * T, -1, cfg.num_cores),
                             cfg.pre_value_act)
        bags = cfg.value_expansion
        pooled_TGDv = self.values.pool(row_TK, bag_TK if bags > 1 else None, w_TKC, bags)
        return self.w_o(pooled_TGDv.reshape(B, T, -1).to(self.w_o.weight.dtype))

    def slot_locations(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Virtual slots -> (table row, bag): p = perm[v], bag p // W, row (p % W + offset) % rows
        (W the window's rows; offset layer_index * n^2 with share_ratio, else 0)."""
        cfg = self.cfg
        phys = self.perm.index_select(0, idx.reshape(-1)).view(idx.shape)
        bag = torch.div(phys, cfg.window_rows, rounding_mode="floor")
        row = phys - bag * cfg.window_rows
        if cfg.share_ratio is not None:
            row = (row + self.layer_index * cfg.num_keys ** 2) % cfg.table_rows
        if cfg.value_expansion == 1:
            bag = torch.zeros_like(bag)
        return row, bag

    def physical_rows(self, indices: torch.Tensor) -> torch.Tensor:
        return self.slot_locations(indices)[0]

    def index_bytes(self, indices: torch.Tensor) -> int:
        return int(torch.unique(indices.reshape(-1)).numel()) * self.perm.element_size()

    def value_parameters(self) -> list[nn.Parameter]:
        return list(self.values.parameters()) + list(self.pre_values.parameters())

    def value_param_counts(self) -> tuple[int, int]:
        """(both tables once, the K rows of both a token reads)."""
        width = self.values.dim + self.pre_values.dim
        return self.values.num_rows * width, self.rows_per_token * width

    def after_optimizer_step(self) -> None:
        """Recompute the stage-1 singular vectors of the changed cores (and drop the key cache)."""
        self.retrieval.refresh_tucker(force=True)

    def refresh_tucker(self) -> None:
        self.after_optimizer_step()

    def aux_loss(self) -> torch.Tensor:
        """V2 has no core loss (SPEC section 5)."""
        return self.w_o.weight.new_zeros(())

    def memory_stats(self) -> dict[str, float]:
        return self.retrieval.core_stats()


def build_layers(cfg: UltraMemV2Config, num_layers: int,
                 table_factory: TableFactory | None = None) -> list[UltraMemV2Layer]:
    """One V2 layer per block: groups of cfg.share_group consecutive layers read one pool (the
    first builds it), or with cfg.share_ratio every layer reads its window of one model-wide pool."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        fail("num_layers", "must be a positive int", num_layers)
    if cfg.share_ratio is not None and cfg.depth != num_layers:
        fail("depth", f"must equal num_layers={num_layers} with share_ratio (the pool has depth * n^2 "
              "rows, one window start per layer)", cfg.depth)
    layers: list[UltraMemV2Layer] = []
    for i in range(num_layers):
        if cfg.share_ratio is not None:
            owner = layers[0] if layers else None
        else:
            owner = layers[i - i % cfg.share_group] if i % cfg.share_group else None
        layers.append(UltraMemV2Layer(cfg, table_factory, shared=owner, layer_index=i))
    return layers
