"""Weighted pooling of kept value rows (the memory-bound hot path of every memory layer).

Shape legend (suffixes on tensor names):
    T  tokens (batch and time flattened)     K  kept entries per token
    G  bags per token (IVE blocks; 1 for PKM)
    C  value chunks (MCS cores h)            Dc chunk width (D_v / h)
    N  storage rows of the table (physical rows * C)
    U  distinct storage rows read (pool_gathered)

Semantics, shared by every implementation:
    out_TGCDc[t, g, c] = sum over k with bag_TK[t, k] == g of  w_TKC[t, k, c] * W[row_TK[t, k] * C + c]

The table is stored as (rows * C, Dc) so chunk c of row i is storage row i * C + c: every
(token, bag, chunk) is one bag of `embedding_bag` with a scalar weight per entry, and row-sparse
gradients stay possible (a sparse gradient cannot flow back through a reshape).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import register, select


def pool_reference(weight_NDc: torch.Tensor, row_TK: torch.Tensor, bag_TK: torch.Tensor | None,
                   w_TKC: torch.Tensor, num_bags: int, sparse: bool = False) -> torch.Tensor:
    """The oracle: gather every kept row, weight it and sum with a one-hot bag matrix."""
    C = w_TKC.shape[-1]
    idx_TKC = row_TK.unsqueeze(-1) * C + torch.arange(C, device=row_TK.device)
    gathered_TKCDc = F.embedding(idx_TKC, weight_NDc, sparse=sparse)
    if bag_TK is None:
        bag_TK = torch.zeros_like(row_TK)
    onehot_TKG = F.one_hot(bag_TK, num_bags).to(gathered_TKCDc.dtype)
    return torch.einsum("tkg,tkc,tkcd->tgcd", onehot_TKG, w_TKC.to(gathered_TKCDc.dtype), gathered_TKCDc)


def bag_layout(row_TK: torch.Tensor, bag_TK: torch.Tensor | None, w_TKC: torch.Tensor,
               num_bags: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The (storage row, offsets, per-sample weight) arguments of one `embedding_bag`-style call
    that computes every (token, chunk, bag) sum, and the number of bags G it yields per chunk.

    Each token's entries are stably sorted by bag so that every bag is a contiguous run; the bag
    order is (token, chunk, bag): `unbag` turns the (T * C * G, Dc) result back into (T, G, C, Dc).
    Quantised and offloaded tables (ultramem.quantized / ultramem.offload) reuse this layout.
    """
    T, K = row_TK.shape
    C = w_TKC.shape[-1]
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
    counts = counts_TG.unsqueeze(1).expand(T, C, num_bags).reshape(-1)
    offsets = torch.cumsum(counts, 0) - counts
    return idx_TCK.reshape(-1), offsets, w_TKC.transpose(1, 2).reshape(-1), num_bags


def unbag(out: torch.Tensor, T: int, C: int, num_bags: int) -> torch.Tensor:
    """(T * C * G, Dc) bag sums in `bag_layout` order -> (T, G, C, Dc)."""
    return out.view(T, C, num_bags, -1).transpose(1, 2)


def pool_fused(weight_NDc: torch.Tensor, row_TK: torch.Tensor, bag_TK: torch.Tensor | None,
               w_TKC: torch.Tensor, num_bags: int, sparse: bool = False) -> torch.Tensor:
    """One `embedding_bag` call over all (token, chunk, bag) bags; no (T, K, dim) gather is built."""
    T, C = row_TK.shape[0], w_TKC.shape[-1]
    idx, offsets, psw, G = bag_layout(row_TK, bag_TK, w_TKC.to(weight_NDc.dtype), num_bags)
    out = F.embedding_bag(idx, weight_NDc, offsets, mode="sum", per_sample_weights=psw, sparse=sparse)
    return unbag(out, T, C, G)


def pool_gathered(rows_fn, row_TK: torch.Tensor, bag_TK: torch.Tensor | None, w_TKC: torch.Tensor,
                  num_bags: int, row_scale_N: torch.Tensor | None = None) -> torch.Tensor:
    """Pool from a table that is not one dense tensor (quantised, on disk, in host memory):
    `rows_fn(uniq_U)` returns the U distinct storage rows read as a dense (U, Dc) tensor on the
    indices' device, and one `embedding_bag` over that small table does the weighted sums.
    row_scale_N (optional, per storage row) multiplies each entry's weight: a per-row scale folded
    into the weights instead of a pass over the rows. Summation order is that of `pool_fused`, so
    a lossless rows_fn (and no scale) gives its exact result."""
    T, C = row_TK.shape[0], w_TKC.shape[-1]
    idx, offsets, psw, G = bag_layout(row_TK, bag_TK, w_TKC, num_bags)
    uniq_U, inverse = torch.unique(idx, return_inverse=True)
    dense_UDc = rows_fn(uniq_U)
    psw = psw.to(dense_UDc.dtype)
    if row_scale_N is not None:
        psw = psw * row_scale_N.index_select(0, idx).to(dense_UDc.dtype)
    out = F.embedding_bag(inverse, dense_UDc, offsets, mode="sum", per_sample_weights=psw)
    return unbag(out, T, C, G)


register("pool", "reference", pool_reference, reference=True)
register("pool", "embedding_bag", pool_fused)


def pool(weight_NDc: torch.Tensor, row_TK: torch.Tensor, bag_TK: torch.Tensor | None, w_TKC: torch.Tensor,
         num_bags: int = 1, sparse: bool = False) -> torch.Tensor:
    """(T, G, C, Dc) pooled chunks; the implementation is picked by `dispatch.select`."""
    return select("pool", weight_NDc).fn(weight_NDc, row_TK, bag_TK, w_TKC, num_bags, sparse)
