"""Configuration of the memory layers: `UltraMemConfig` (v1, SPEC section 4) and `PKMConfig`.

Every impossible combination is rejected at construction with a ValueError that names the field,
the rule and the value given, so a bad config never reaches a forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from .confbase import ConfigBase, fail, param

NormKind = Literal["rms", "layer"]
PKMNormKind = Literal["batch", "layer", "rms", "none"]
InitKind = Literal["paper", "authors", "calibrated"]
LookupKind = Literal["fused", "reference"]
ScoreKind = Literal["tucker", "additive"]
SearchKind = Literal["rank1", "rank1_both_signs", "exact"]
NORM_KINDS, PKM_NORM_KINDS, INIT_KINDS = get_args(NormKind), get_args(PKMNormKind), get_args(InitKind)
LOOKUP_KINDS, SCORE_KINDS, SEARCH_KINDS = get_args(LookupKind), get_args(ScoreKind), get_args(SearchKind)


class _ConfigMixin(ConfigBase):
    """Deprecated name of `ConfigBase` (kept for code written against 0.1)."""


@dataclass(frozen=True)
class UltraMemConfig(ConfigBase):
    """One UltraMem (v1) memory layer. Defaults follow SPEC section 4.

    n = num_keys keys per side per head, N = n^2 physical value rows, E = value_expansion virtual
    copies (n' = sqrt(E)*n keys actually scored per side), h = num_cores Tucker cores = MCS chunks.
    """

    dim: int = param(doc="input width D", ge=1)
    num_keys: int = param(256, "n keys per side per head; N = n^2 physical value rows", ge=1)
    key_dim: int = param(128, "D_k, query/key width per side", ge=1)
    value_dim: int | None = param(None, "D_v, width of one value row (null: `dim // 2`)", ge=1)
    heads: int = param(2, "H retrieval heads (share one query and one value table)", ge=1)
    topk: int = param(32, "m values kept per head", ge=1)
    stage1_topk: int | None = param(None, "m1 rows and columns kept by the rank-1 stage-1 filter "
                                    "(<= n'; null: `min(topk, 128)`)", ge=1)
    # How the top-m slots are found. "rank1" (SPEC): the m1 best rows/columns under the rank-1
    # proxy, then exact scores on that grid. "rank1_both_signs": m1/2 from each end of each proxy,
    # since a slot whose row and column proxies are both negative has a positive product and is
    # invisible to "rank1" (measured: 56-83% of the exact top-m after training). "exact": brute
    # force over the whole n' x n' grid (the oracle; cost grows with n'^2).
    topm_search: SearchKind = param("rank1", "`rank1` (SPEC: top m1 of each rank-1 proxy), "
                                    "`rank1_both_signs` (m1/2 from each end of each proxy) or `exact` "
                                    "(brute force over the n' x n' grid)")
    tucker_rank: int = param(2, "r, rank components of every key", ge=1)
    num_cores: int = param(2, "h Tucker cores = MCS chunks of a value row (`value_dim % num_cores == 0`)",
                           ge=1)
    value_expansion: int = param(4, "E virtual copies per physical row (a perfect square); n' = sqrt(E) n "
                                 "keys scored per side", ge=1)
    dim_out: int | None = param(None, "output width (null: `dim`)", ge=1)
    depth: int = param(1, "L, number of transformer blocks (only used by the value init "
                       "N(0, E/(2 m H L)))", ge=1)
    norm: NormKind = param("rms", "query/key norm: `rms` or `layer` (learnable gain)")
    score: ScoreKind = param("tucker", "`tucker` (TDQKR) or `additive` (PKM's row + column score; needs "
                             "r = h = 1; an ablation rung)")
    query_conv: bool = param(False, "causal depthwise conv (kernel 3) before the query projection, "
                             "initialised as the identity (carried across KV-cache decode steps)")
    core_loss_coef: float = param(0.0, "alpha of the auxiliary loss on the summed cores' singular values "
                                  "(0 = off)", ge=0)
    core_loss_tau: float = param(0.15, "tau of that loss", ge=0)
    # Not in the paper (it removed PKM's softmax, SPEC section 7): an option because without its
    # softmax PKM stored far fewer facts in the capacity suite (EXPERIMENTS.md, "Knowledge capacity").
    softmax: bool = param(False, "softmax of each head's m kept scores (per core) before pooling, as "
                          "PKM does; false = the paper's raw scores")
    # "paper" (SPEC), "authors" (their code: values N(0, 0.02^2), gains D_k^-0.33) or "calibrated"
    # (the paper's, with the query gain set from the measured kept scores instead of E[Y])
    init: InitKind = param("paper", "`paper` (SPEC section 4), `authors` (values N(0, 0.02^2), norm gains "
                           "D_k^-0.33) or `calibrated` (the paper's, with the query gain measured so "
                           "kept scores have RMS 1)")
    # Overrides only the value table's init std (the rest of `init` stays). The paper's formula
    # sqrt(E/(2 m H L)) is large for shallow models reading few slots (0.125 at L=4, m=16, H=2,
    # E=4; 0.025 at the authors' L=20, m=80): at that scale 0.02 values trained better, and large ones
    # stayed in the output as random content (EXPERIMENTS.md, "collapse").
    value_init_std: float | None = param(None, "overrides only the value table's init std (null: the "
                                         "`init`'s own; see EXPERIMENTS.md, \"initialisation\")", gt=0)
    lookup: LookupKind = param("fused", "`fused` (the fastest pooling `ultramem.ops` has for the device) "
                               "or `reference` (gather + einsum, the test oracle)")
    sparse_values: bool = param(False, "row-sparse value gradients (pair with a sparse/lazy optimiser "
                                "such as `torch.optim.SparseAdam`)")

    def validate(self):
        if self.topm_search == "rank1_both_signs" and (self.score != "tucker" or self.m1 < 2):
            fail("topm_search", "'rank1_both_signs' needs score='tucker' (a bilinear product has "
                 "two signs; an additive score has one) and stage1_topk >= 2",
                 f"{self.topm_search} with score={self.score}, stage1_topk={self.m1}")
        if self.score == "additive" and (self.tucker_rank, self.num_cores) != (1, 1):
            fail("score", "'additive' (PKM-style row + column) needs tucker_rank=1 and num_cores=1",
                 f"{self.score} with tucker_rank={self.tucker_rank}, num_cores={self.num_cores}")
        root = math.isqrt(self.value_expansion)
        if root * root != self.value_expansion:
            fail("value_expansion", "must be a perfect square (1, 4, 9, 16, ...)", self.value_expansion)
        if self.v_dim % self.num_cores:
            fail("value_dim", f"must be divisible by num_cores={self.num_cores}", self.v_dim)
        if self.stage1_topk is not None and self.stage1_topk > self.keys_per_side:
            fail("stage1_topk", f"must be <= keys scored per side n'=sqrt(E)*n={self.keys_per_side}",
                 self.stage1_topk)
        if self.m1 * self.m1 < self.topk:
            fail("topk", f"must be <= stage1_topk^2={self.m1 * self.m1} (the stage-2 grid)", self.topk)
        if self.topk > self.keys_per_side ** 2:
            fail("topk", f"must be <= the virtual grid n'^2={self.keys_per_side ** 2}", self.topk)
        if self.tucker_rank < 2 and self.core_loss_coef > 0:
            fail("core_loss_coef", "needs tucker_rank >= 2 (the loss penalises singular values 2..r)",
                 self.core_loss_coef)

    @property
    def v_dim(self) -> int:
        return self.value_dim if self.value_dim is not None else max(1, self.dim // 2)

    @property
    def out_dim(self) -> int:
        return self.dim_out if self.dim_out is not None else self.dim

    @property
    def keys_per_side(self) -> int:
        """n' = sqrt(E) * n."""
        return math.isqrt(self.value_expansion) * self.num_keys

    @property
    def m1(self) -> int:
        if self.stage1_topk is not None:
            return self.stage1_topk
        return min(self.topk, 128, self.keys_per_side)

    @property
    def num_values(self) -> int:
        """N = n^2 physical value rows."""
        return self.num_keys * self.num_keys

    @property
    def num_virtual(self) -> int:
        return self.value_expansion * self.num_values


@dataclass(frozen=True)
class PKMConfig(ConfigBase):
    """Product-key memory (Lample et al. 2019), SPEC section 3; the start of the ablation ladder.

    key_dim is the full query width per head; each half (key_dim/2) scores one sub-key set.
    `memory_plus` adds Meta's Memory+ gate: pooled value * SiLU(W_g x), then a W_o projection.
    """

    dim: int = param(doc="input width D", ge=1)
    num_keys: int = param(256, "n sub-keys per side per head; N = n^2 values", ge=1)
    key_dim: int = param(256, "full query width per head (even; each half scores one sub-key set)", ge=1)
    value_dim: int | None = param(None, "width of a value row (null: `dim_out`, full width as in PKM)", ge=1)
    heads: int = param(4, "heads (one value table shared by all)", ge=1)
    topk: int = param(32, "k, kept per side and in the end", ge=1)
    dim_out: int | None = param(None, "output width (null: `dim`)", ge=1)
    depth: int = param(1, "unused by PKM's init; kept so model code can treat memories alike", ge=1)
    query_norm: PKMNormKind = param("batch", "`batch` (as in PKM), `layer`, `rms` or `none`")
    softmax: bool = param(True, "softmax over the kept k (false: raw scores, the 'rm softmax' rung)")
    share_query: bool = param(False, "one query shared by all heads ('share query' rung)")
    key_norm: bool = param(False, "RMS-normalise sub-keys with a learnable gain ('query/key norm' rung)")
    memory_plus: bool = param(False, "Memory+: SiLU(W_g x) gate on the pooled value, then W_o")
    value_init_std: float | None = param(None, "value init std (null: `value_dim ** -0.5`, PKM's)", gt=0)
    lookup: LookupKind = param("fused", "`fused` or `reference` (as in UltraMemConfig)")
    sparse_values: bool = param(False, "row-sparse value gradients")

    def validate(self):
        if self.key_dim % 2:
            fail("key_dim", "must be even (split into two halves, one per sub-key set)", self.key_dim)
        if self.topk > self.num_keys:
            fail("topk", f"must be <= num_keys={self.num_keys} (top-k per side)", self.topk)

    @property
    def out_dim(self) -> int:
        return self.dim_out if self.dim_out is not None else self.dim

    @property
    def v_dim(self) -> int:
        return self.value_dim if self.value_dim is not None else self.out_dim

    @property
    def num_values(self) -> int:
        return self.num_keys * self.num_keys
