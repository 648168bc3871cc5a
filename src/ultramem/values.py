"""Value tables and weighted pooling of the kept rows (the memory-bound hot path).

Shape legend (suffixes on tensor names):
    T  tokens (batch and time flattened)     K  kept entries per token (heads * topk)
    G  bags per token (IVE blocks E; 1 for PKM)
    C  value chunks (MCS cores h)            D  chunk width (D_v / h)
    N  physical value rows

Pooling semantics, shared by every implementation:
    out_TGCD[t, g, c] = sum over k with bag_TK[t, k] == g of  w_TKC[t, k, c] * V[row_TK[t, k], chunk c]

The table is stored as (N * C, D) so that chunk c of row i is storage row i * C + c. That layout
makes every (token, bag, chunk) one bag of `embedding_bag` with a scalar weight per entry, and
keeps row-sparse gradients possible (a sparse gradient cannot flow back through a reshape).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

POOL_IMPLS = ("fused", "reference")


class ValueTable(nn.Module):
    """N rows of width `dim`, read in `num_chunks` equal chunks.

    Subclass and override `pool` to put the table elsewhere (sharded over processes, offloaded):
    the retrieval code only ever calls `pool` and never touches `weight` directly.
    """

    def __init__(self, num_rows: int, dim: int, num_chunks: int = 1, sparse: bool = False):
        super().__init__()
        if dim % num_chunks:
            raise ValueError(f"dim: must be divisible by num_chunks={num_chunks} (got {dim})")
        self.num_rows, self.dim, self.num_chunks = num_rows, dim, num_chunks
        self.chunk_dim = dim // num_chunks
        self.sparse = sparse
        self.weight = nn.Parameter(torch.empty(num_rows * num_chunks, self.chunk_dim))
        self.read_counts: torch.Tensor | None = None  # per-row reads in training mode (not state)

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

    def pool(self, row_TK: torch.Tensor, bag_TK: torch.Tensor | None, w_TKC: torch.Tensor,
             num_bags: int = 1, impl: str = "fused") -> torch.Tensor:
        """Weighted sums of kept rows per (token, bag, chunk) -> (T, num_bags, dim)."""
        if self.read_counts is not None and self.training:
            flat = row_TK.reshape(-1)
            self.read_counts.index_add_(0, flat, torch.ones_like(flat))
        if impl == "fused":
            out_TGCD = pool_fused(self.weight, row_TK, bag_TK, w_TKC, num_bags, self.sparse)
        elif impl == "reference":
            out_TGCD = pool_reference(self.weight, row_TK, bag_TK, w_TKC, num_bags, self.sparse)
        else:
            raise ValueError(f"impl: must be one of {POOL_IMPLS} (got {impl!r})")
        return out_TGCD.reshape(row_TK.shape[0], num_bags, self.dim)

    def extra_repr(self) -> str:
        return f"rows={self.num_rows}, dim={self.dim}, chunks={self.num_chunks}, sparse={self.sparse}"


def pool_reference(weight_ND: torch.Tensor, row_TK: torch.Tensor, bag_TK: torch.Tensor | None,
                   w_TKC: torch.Tensor, num_bags: int, sparse: bool = False) -> torch.Tensor:
    """The oracle: gather every kept row, weight it and sum with a one-hot bag matrix."""
    C = w_TKC.shape[-1]
    idx_TKC = row_TK.unsqueeze(-1) * C + torch.arange(C, device=row_TK.device)
    gathered_TKCD = F.embedding(idx_TKC, weight_ND, sparse=sparse)
    if bag_TK is None:
        bag_TK = torch.zeros_like(row_TK)
    onehot_TKG = F.one_hot(bag_TK, num_bags).to(gathered_TKCD.dtype)
    return torch.einsum("tkg,tkc,tkcd->tgcd", onehot_TKG, w_TKC.to(gathered_TKCD.dtype), gathered_TKCD)


def pool_fused(weight_ND: torch.Tensor, row_TK: torch.Tensor, bag_TK: torch.Tensor | None,
               w_TKC: torch.Tensor, num_bags: int, sparse: bool = False) -> torch.Tensor:
    """One `embedding_bag` call over all (token, chunk, bag) bags; no (T, K, dim) gather is built.

    Each token's entries are stably sorted by bag so that every bag is a contiguous run; the bag
    order is (token, chunk, bag), which the final permute turns back into (token, bag, chunk).
    """
    T, K = row_TK.shape
    C = w_TKC.shape[-1]
    w_TKC = w_TKC.to(weight_ND.dtype)
    if bag_TK is not None and num_bags > 1:
        order_TK = torch.argsort(bag_TK, dim=1, stable=True)
        row_TK = row_TK.gather(1, order_TK)
        w_TKC = w_TKC.gather(1, order_TK.unsqueeze(-1).expand(T, K, C))
        counts_TG = torch.zeros(T, num_bags, dtype=torch.long, device=row_TK.device)
        counts_TG.scatter_add_(1, bag_TK, torch.ones_like(bag_TK))
    else:
        num_bags = 1
        counts_TG = torch.full((T, 1), K, dtype=torch.long, device=row_TK.device)
    chunk_C = torch.arange(C, device=row_TK.device)
    idx_TCK = row_TK.unsqueeze(1) * C + chunk_C.view(1, C, 1)
    w_TCK = w_TKC.transpose(1, 2)
    counts = counts_TG.unsqueeze(1).expand(T, C, num_bags).reshape(-1)
    offsets = torch.cumsum(counts, 0) - counts
    out = F.embedding_bag(idx_TCK.reshape(-1), weight_ND, offsets, mode="sum",
                          per_sample_weights=w_TCK.reshape(-1), sparse=sparse)
    return out.view(T, C, num_bags, -1).transpose(1, 2)
