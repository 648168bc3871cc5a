"""Value tables: where a memory layer's rows live and how the kept ones are pooled.

`ValueTable` is the in-memory table every layer gets by default (see `memory.TableFactory`): a
sharded, quantised or offloaded table is another class with the same `pool` / `init_weights`
methods, handed to the layer through its `table_factory` argument. The pooling maths and its
implementations are in `ultramem.ops.pooling`.

Shape legend: T tokens, K kept entries per token, G bags per token, C chunks, N physical rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ops import dispatch
from .ops.pooling import pool_fused, pool_reference

LOOKUP_KINDS = ("fused", "reference")
POOL_IMPLS = LOOKUP_KINDS  # deprecated name, kept for callers of the 0.1 API

__all__ = ["LOOKUP_KINDS", "POOL_IMPLS", "ValueTable", "pool_fused", "pool_reference"]


def check_table_shape(dim: int, num_chunks: int, lookup: str) -> None:
    """The rules every value table's geometry follows (in-memory, sharded, quantised, offloaded)."""
    if dim % num_chunks:
        raise ValueError(f"dim: must be divisible by num_chunks={num_chunks} (got {dim})")
    if lookup not in LOOKUP_KINDS:
        raise ValueError(f"lookup: must be one of {LOOKUP_KINDS} (got {lookup!r})")


class ValueTable(nn.Module):
    """N rows of width `dim`, read in `num_chunks` equal chunks; stored as (N * chunks, dim / chunks).

    lookup: "fused" lets `ultramem.ops` pick the fastest pooling for the device and dtype;
    "reference" always runs the gather + einsum oracle.
    """

    def __init__(self, num_rows: int, dim: int, num_chunks: int = 1, sparse: bool = False,
                 lookup: str = "fused"):
        super().__init__()
        check_table_shape(dim, num_chunks, lookup)
        self.num_rows, self.dim, self.num_chunks = num_rows, dim, num_chunks
        self.chunk_dim = dim // num_chunks
        self.sparse = sparse
        self.lookup = lookup
        self.weight = nn.Parameter(torch.empty(num_rows * num_chunks, self.chunk_dim))
        self.read_counts: torch.Tensor | None = None  # per-row reads in training mode (not state)

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        """Every entry N(0, std^2) (each layer's init decides the std; see its `init_weights`)."""
        nn.init.normal_(self.weight, std=std)

    def count_reads(self, enabled: bool = True) -> None:
        """Start (or stop) tallying, per physical row, how often `pool` reads it in training mode:
        the dead-row statistics of a run. Costs one index_add over the kept rows per call."""
        self.read_counts = (torch.zeros(self.num_rows, dtype=torch.long, device=self.weight.device)
                            if enabled else None)

    def take_read_counts(self) -> torch.Tensor:
        """The tally since the last call (or since `count_reads`), and restart it from zero."""
        if self.read_counts is None:
            raise RuntimeError("take_read_counts: call count_reads() first")
        counts, self.read_counts = self.read_counts, torch.zeros_like(self.read_counts)
        return counts

    def rows(self) -> torch.Tensor:
        """The table as (N, dim) (a view; for inspection and tests)."""
        return self.weight.view(self.num_rows, self.dim)

    def gather(self, row_X: torch.Tensor) -> torch.Tensor:
        """The full rows (..., dim) at `row_X` (all chunks), with autograd (row-sparse when `sparse`):
        for per-row products such as UltraMemV2's pre-value dots, where pooling is not wanted."""
        if self.read_counts is not None and self.training:
            flat = row_X.reshape(-1)
            self.read_counts.index_add_(0, flat, torch.ones_like(flat))
        C = self.num_chunks
        idx_XC = row_X.unsqueeze(-1) * C + torch.arange(C, device=row_X.device)
        return F.embedding(idx_XC, self.weight, sparse=self.sparse).reshape(*row_X.shape, self.dim)

    def pool(self, row_TK: torch.Tensor, bag_TK: torch.Tensor | None, w_TKC: torch.Tensor,
             num_bags: int = 1, impl: str | None = None) -> torch.Tensor:
        """Weighted sums of kept rows per (token, bag, chunk) -> (T, num_bags, dim).

        impl (deprecated; the table's `lookup` decides): "reference" forces the oracle."""
        if self.read_counts is not None and self.training:
            flat = row_TK.reshape(-1)
            self.read_counts.index_add_(0, flat, torch.ones_like(flat))
        lookup = self.lookup if impl is None else impl
        if lookup not in LOOKUP_KINDS:
            raise ValueError(f"impl: must be one of {LOOKUP_KINDS} (got {lookup!r})")
        fn = pool_reference if lookup == "reference" else dispatch.select("pool", self.weight).fn
        out_TGCDc = fn(self.weight, row_TK, bag_TK, w_TKC, num_bags, self.sparse)
        return out_TGCDc.reshape(row_TK.shape[0], num_bags, self.dim)

    def extra_repr(self) -> str:
        return (f"rows={self.num_rows}, dim={self.dim}, chunks={self.num_chunks}, sparse={self.sparse}, "
                f"lookup={self.lookup}")
