"""Configuration of the memory layers: `UltraMemConfig` (v1, SPEC section 4) and `PKMConfig`.

Every impossible combination is rejected at construction with a ValueError that names the field,
the rule and the value given, so a bad config never reaches a forward pass.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

NORM_KINDS = ("rms", "layer")
PKM_NORM_KINDS = ("batch", "layer", "rms", "none")
INIT_KINDS = ("paper", "authors", "calibrated")
LOOKUP_KINDS = ("fused", "reference")
SCORE_KINDS = ("tucker", "additive")
SEARCH_KINDS = ("rank1", "rank1_both_signs", "exact")


def _fail(field: str, rule: str, value) -> None:
    raise ValueError(f"{field}: {rule} (got {value!r})")


def _optional_positive_number(name: str, value) -> None:
    ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0)
    if not ok:  # NaN fails `value > 0` too
        _fail(name, "must be a number > 0, or None for the default", value)


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(name, "must be a positive int", value)


def _choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _fail(name, f"must be one of {allowed}", value)


class _ConfigMixin:
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; allowed: {sorted(names)}")
        return cls(**d)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class UltraMemConfig(_ConfigMixin):
    """One UltraMem (v1) memory layer. Defaults follow SPEC section 4.

    n = num_keys keys per side per head, N = n^2 physical value rows, E = value_expansion virtual
    copies (n' = sqrt(E)*n keys actually scored per side), h = num_cores Tucker cores = MCS chunks.
    """

    dim: int
    num_keys: int = 256  # n
    key_dim: int = 128  # D_k, query/key width per side
    value_dim: int | None = None  # D_v; default dim // 2
    heads: int = 2  # H retrieval heads
    topk: int = 32  # m values kept per head
    stage1_topk: int | None = None  # m1 row/col candidates; default min(topk, 128)
    # How the top-m slots are found. "rank1" (SPEC): the m1 best rows/columns under the rank-1
    # proxy, then exact scores on that grid. "rank1_both_signs": m1/2 from each end of each proxy,
    # since a slot whose row and column proxies are both negative has a positive product and is
    # invisible to "rank1" (measured: 56-83% of the exact top-m after training). "exact": brute
    # force over the whole n' x n' grid (the oracle; cost grows with n'^2).
    topm_search: str = "rank1"
    tucker_rank: int = 2  # r
    num_cores: int = 2  # h (MCS chunks)
    value_expansion: int = 4  # E, a perfect square
    dim_out: int | None = None  # default dim
    depth: int = 1  # L, number of transformer blocks; used only by the initialisation
    norm: str = "rms"  # query/key norm kind
    score: str = "tucker"  # "tucker" (TDQKR) or "additive" (PKM's row + column; needs r = h = 1)
    query_conv: bool = False  # causal depthwise conv (kernel 3) on the input before W_q
    core_loss_coef: float = 0.0  # alpha of the optional core auxiliary loss; 0 disables it
    core_loss_tau: float = 0.15
    # "paper" (SPEC), "authors" (their code: values N(0, 0.02^2), gains D_k^-0.33) or "calibrated"
    # (the paper's, with the query gain set from the measured kept scores instead of E[Y])
    init: str = "paper"
    # Overrides only the value table's init std (the rest of `init` stays). The paper's formula
    # sqrt(E/(2 m H L)) is large for shallow models reading few slots (0.125 at L=4, m=16, H=2,
    # E=4; 0.025 at the authors' L=20, m=80): at that scale 0.02 values trained better, and large ones
    # stayed in the output as random content (EXPERIMENTS.md, "collapse").
    value_init_std: float | None = None
    lookup: str = "fused"  # "fused" (embedding_bag) or "reference" (gather + einsum, the oracle)
    sparse_values: bool = False  # row-sparse value gradients (use a sparse/lazy optimiser for them)

    def __post_init__(self):
        for name in ("dim", "num_keys", "key_dim", "heads", "topk", "tucker_rank", "num_cores",
                     "value_expansion", "depth"):
            _positive_int(name, getattr(self, name))
        for name in ("value_dim", "stage1_topk", "dim_out"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        _choice("norm", self.norm, NORM_KINDS)
        _choice("init", self.init, INIT_KINDS)
        _choice("lookup", self.lookup, LOOKUP_KINDS)
        _choice("score", self.score, SCORE_KINDS)
        _choice("topm_search", self.topm_search, SEARCH_KINDS)
        if self.topm_search == "rank1_both_signs" and (self.score != "tucker" or self.m1 < 2):
            _fail("topm_search", "'rank1_both_signs' needs score='tucker' (a bilinear product has "
                  "two signs; an additive score has one) and stage1_topk >= 2",
                  f"{self.topm_search} with score={self.score}, stage1_topk={self.m1}")
        if self.score == "additive" and (self.tucker_rank, self.num_cores) != (1, 1):
            _fail("score", "'additive' (PKM-style row + column) needs tucker_rank=1 and num_cores=1",
                  f"{self.score} with tucker_rank={self.tucker_rank}, num_cores={self.num_cores}")
        root = math.isqrt(self.value_expansion)
        if root * root != self.value_expansion:
            _fail("value_expansion", "must be a perfect square (1, 4, 9, 16, ...)", self.value_expansion)
        if self.v_dim % self.num_cores:
            _fail("value_dim", f"must be divisible by num_cores={self.num_cores}", self.v_dim)
        if self.stage1_topk is not None and self.stage1_topk > self.keys_per_side:
            _fail("stage1_topk", f"must be <= keys scored per side n'=sqrt(E)*n={self.keys_per_side}",
                  self.stage1_topk)
        if self.m1 * self.m1 < self.topk:
            _fail("topk", f"must be <= stage1_topk^2={self.m1 * self.m1} (the stage-2 grid)", self.topk)
        if self.topk > self.keys_per_side ** 2:
            _fail("topk", f"must be <= the virtual grid n'^2={self.keys_per_side ** 2}", self.topk)
        if self.core_loss_coef < 0:
            _fail("core_loss_coef", "must be >= 0", self.core_loss_coef)
        _optional_positive_number("value_init_std", self.value_init_std)
        if self.tucker_rank < 2 and self.core_loss_coef > 0:
            _fail("core_loss_coef", "needs tucker_rank >= 2 (the loss penalises singular values 2..r)",
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
class PKMConfig(_ConfigMixin):
    """Product-key memory (Lample et al. 2019), SPEC section 3; the start of the ablation ladder.

    key_dim is the full query width per head; each half (key_dim/2) scores one sub-key set.
    `memory_plus` adds Meta's Memory+ gate: pooled value * SiLU(W_g x), then a W_o projection.
    """

    dim: int
    num_keys: int = 256  # n sub-keys per side per head; N = n^2 values
    key_dim: int = 256
    value_dim: int | None = None  # default dim_out (full width, as in PKM)
    heads: int = 4
    topk: int = 32  # k, per side and final
    dim_out: int | None = None
    depth: int = 1  # unused by PKM's init; kept so model code can treat memories alike
    query_norm: str = "batch"
    softmax: bool = True  # False = raw scores ("rm softmax" rung of the ablation)
    share_query: bool = False  # one query shared by all heads ("share query" rung)
    key_norm: bool = False  # RMS-normalise sub-keys with a learnable gain ("query/key norm" rung)
    memory_plus: bool = False
    value_init_std: float | None = None  # default value_dim ** -0.5 (PKM's choice)
    lookup: str = "fused"
    sparse_values: bool = False

    def __post_init__(self):
        for name in ("dim", "num_keys", "key_dim", "heads", "topk", "depth"):
            _positive_int(name, getattr(self, name))
        for name in ("value_dim", "dim_out"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        _choice("query_norm", self.query_norm, PKM_NORM_KINDS)
        _choice("lookup", self.lookup, LOOKUP_KINDS)
        if self.key_dim % 2:
            _fail("key_dim", "must be even (split into two halves, one per sub-key set)", self.key_dim)
        if self.topk > self.num_keys:
            _fail("topk", f"must be <= num_keys={self.num_keys} (top-k per side)", self.topk)
        _optional_positive_number("value_init_std", self.value_init_std)

    @property
    def out_dim(self) -> int:
        return self.dim_out if self.dim_out is not None else self.dim

    @property
    def v_dim(self) -> int:
        return self.value_dim if self.value_dim is not None else self.out_dim

    @property
    def num_values(self) -> int:
        return self.num_keys * self.num_keys
