"""Value tables sharded over the mesh's `mp` group: drop-ins for `ultramem.values.ValueTable`.

Both keep the table as one DTensor parameter `weight` whose global shape is ValueTable's
(N * C, D_v / C), so a sharded model's state_dict has the single-process names and shapes:
`weight.full_tensor()` is the whole table and DCP saves / reshards it.

- `DimShardedTable` (SPEC 8, dimension-wise; Shard(1)): every rank holds every row and 1/P of
  each MCS chunk's width. pool: all-gather the group's (row, bag) ids and weights, pool this
  rank's column slice for every token of the group, all-to-all each token's slices home.
  Traffic does not depend on which rows are read.
- `RowShardedTable` (number-wise; Shard(0)): rank r holds rows [r N/P, (r+1) N/P). pool: each
  kept entry goes to its row's owner (all-to-all with uneven counts), the owner returns one
  partial sum per (token, bag) it saw, the token's rank adds them. Correct under any skew.

Gradients: the weights w get d(out)/dw back on their token's rank; the table shard gets the
gradient of every token of the mp group (the group's batches act as one batch). Over a dp
dimension the trainer still all-reduces the shard's gradient (see `ultramem.distributed.train`).

Shape legend: T tokens, K kept entries per token, G bags per token, C chunks, W local chunk
width, Z entries (flattened T*K), Y partial sums (segments), I mp ranks (`self.P` of them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from ..ops import dispatch
from ..ops.pooling import pool_reference
from ..values import check_table_shape
from . import comm
from .mesh import mp_mesh, table_placements


class _ShardedTable(nn.Module):
    layout = ""
    shard_dim = 0

    def __init__(self, num_rows: int, dim: int, num_chunks: int, mesh: DeviceMesh, lookup: str = "fused",
                 sparse: bool = False):
        super().__init__()
        check_table_shape(dim, num_chunks, lookup)
        self.num_rows, self.dim, self.num_chunks = num_rows, dim, num_chunks
        self.chunk_dim = dim // num_chunks
        self.lookup = lookup
        self.sparse = False  # DTensor parameters take dense gradients; `sparse` is accepted for the factory
        self.mesh = mesh
        sub = mp_mesh(mesh)
        self.group, self.P, self.rank = sub.get_group(), sub.size(), sub.get_local_rank()
        self._check_divisible()
        local = torch.empty(self.local_shape(), device=mesh.device_type)
        self.weight = nn.Parameter(DTensor.from_local(local, mesh, table_placements(mesh, self.shard_dim),
                                                      run_check=False))

    def _check_divisible(self) -> None:
        raise NotImplementedError

    def local_shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def local_slice(self, full_NDc: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a full (N * C, D_v / C) table."""
        return full_NDc.tensor_split(self.P, dim=self.shard_dim)[self.rank]

    @torch.no_grad()
    def load_full(self, full_NDc: torch.Tensor) -> None:
        """Copy this rank's slice of the whole table (same on every rank) into the shard."""
        self.weight.to_local().copy_(self.local_slice(full_NDc.to(self.weight.device)))

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        """N(0, std^2): the whole table is drawn (the same draws on every rank seeded alike), then sliced."""
        full = torch.empty(self.num_rows * self.num_chunks, self.chunk_dim, device=self.weight.device)
        self.load_full(nn.init.normal_(full, std=std))

    def full_weight(self) -> torch.Tensor:
        """The whole table (N * C, D_v / C) on every rank (a collective)."""
        return self.weight.full_tensor()

    def _pool_fn(self, weight: torch.Tensor):
        return pool_reference if self.lookup == "reference" else dispatch.select("pool", weight).fn

    def extra_repr(self) -> str:
        return (f"rows={self.num_rows}, dim={self.dim}, chunks={self.num_chunks}, layout={self.layout}, "
                f"mp={self.P}, local={tuple(self.local_shape())}")


class DimShardedTable(_ShardedTable):
    """Each rank: every row, columns [r W, (r+1) W) of each chunk (W = D_v / (C P))."""

    layout, shard_dim = "dim", 1

    def _check_divisible(self) -> None:
        if self.chunk_dim % self.P:
            raise ValueError(f"dim: each of the {self.num_chunks} chunks' width {self.chunk_dim} must be "
                             f"divisible by mp={self.P} (got dim={self.dim})")

    def local_shape(self) -> tuple[int, int]:
        return self.num_rows * self.num_chunks, self.chunk_dim // self.P

    def pool(self, row_TK: torch.Tensor, bag_TK: torch.Tensor | None, w_TKC: torch.Tensor,
             num_bags: int = 1) -> torch.Tensor:
        T, K = row_TK.shape
        C, P, G = self.num_chunks, self.P, num_bags
        weight = self.weight.to_local()
        w_TKC = w_TKC.to(weight.dtype)
        counts = comm.all_gather_raw(torch.tensor([T], device=row_TK.device), self.group).tolist()
        Tmax = max(counts)
        ids_TK = row_TK * G + (bag_TK if bag_TK is not None else 0)
        ids_all = comm.all_gather_raw(F.pad(ids_TK, (0, 0, 0, Tmax - T)), self.group)
        w_all = comm.all_gather(F.pad(w_TKC, (0, 0, 0, 0, 0, Tmax - T)), self.group)
        out_all = self._pool_fn(weight)(weight, ids_all // G, ids_all % G, w_all, G, False)
        # Rank s's real tokens are rows [s Tmax, s Tmax + T_s) of the gathered batch.
        send = torch.cat([out_all[s * Tmax: s * Tmax + n] for s, n in enumerate(counts)])
        mine_IT = comm.all_to_all(send.flatten(1), counts, [T] * P, self.group)
        out_TGCIW = mine_IT.view(P, T, G, C, weight.shape[1]).permute(1, 2, 3, 0, 4)
        return out_TGCIW.reshape(T, G, self.dim)


class RowShardedTable(_ShardedTable):
    """Each rank: rows [r N/P, (r+1) N/P) at full width."""

    layout, shard_dim = "row", 0

    def _check_divisible(self) -> None:
        if self.num_rows % self.P:
            raise ValueError(f"num_rows: must be divisible by mp={self.P} (got {self.num_rows})")

    def local_shape(self) -> tuple[int, int]:
        return self.num_rows // self.P * self.num_chunks, self.chunk_dim

    def pool(self, row_TK: torch.Tensor, bag_TK: torch.Tensor | None, w_TKC: torch.Tensor,
             num_bags: int = 1) -> torch.Tensor:
        T, K = row_TK.shape
        C, P, G = self.num_chunks, self.P, num_bags
        weight = self.weight.to_local()
        plan = _route(row_TK, bag_TK, G, self.num_rows // P, P)
        splits = comm.all_to_all_raw(plan.splits_I2, [1] * P, [1] * P, self.group)
        in_e, in_s = splits[:, 0].tolist(), splits[:, 1].tolist()
        ids_Z = comm.all_to_all_raw(plan.ids_Z, plan.send_e, in_e, self.group)
        w_ZC = comm.all_to_all(w_TKC.to(weight.dtype).reshape(T * K, C)[plan.order_Z], plan.send_e, in_e,
                               self.group)
        partial_YDv = _pool_segments(weight, ids_Z, w_ZC, in_e, in_s, C)
        back_YDv = comm.all_to_all(partial_YDv, in_s, plan.send_s, self.group)
        out = back_YDv.new_zeros(T * G, self.dim).index_add(0, plan.seg_tg_Y, back_YDv)
        return out.view(T, G, self.dim)


class _Route:
    """Where a rank's entries go: `order_Z` sorts them by (owner, token, bag); one segment per
    distinct (owner, token, bag); `ids_Z` packs (segment within its message, local row)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _route(row_TK: torch.Tensor, bag_TK: torch.Tensor | None, G: int, rows_per: int, P: int) -> _Route:
    T, K = row_TK.shape
    dev = row_TK.device
    owner_Z = torch.div(row_TK, rows_per, rounding_mode="floor").reshape(-1)
    tok_Z = torch.arange(T, device=dev).repeat_interleave(K)
    bag_Z = bag_TK.reshape(-1) if bag_TK is not None else torch.zeros_like(owner_Z)
    key_Z = (owner_Z * T + tok_Z) * G + bag_Z
    key_sorted, order_Z = torch.sort(key_Z, stable=True)
    segs, seg_of_Z = torch.unique_consecutive(key_sorted, return_inverse=True)
    seg_owner = torch.div(segs, T * G, rounding_mode="floor")
    send_e = torch.bincount(owner_Z, minlength=P)
    send_s = torch.bincount(seg_owner, minlength=P)
    seg_start = torch.cumsum(send_s, 0) - send_s  # first segment of each owner's message
    seg_local_Z = seg_of_Z - seg_start[owner_Z[order_Z]]
    local_row_Z = row_TK.reshape(-1)[order_Z] - owner_Z[order_Z] * rows_per
    return _Route(order_Z=order_Z, ids_Z=seg_local_Z * rows_per + local_row_Z, rows_per=rows_per,
                  send_e=send_e.tolist(), send_s=send_s.tolist(), seg_tg_Y=segs - seg_owner * T * G,
                  splits_I2=torch.stack([send_e, send_s], 1))


def _pool_segments(weight_NDc: torch.Tensor, ids_Z: torch.Tensor, w_ZC: torch.Tensor, in_e: list[int],
                   in_s: list[int], C: int) -> torch.Tensor:
    """The owner's side: one partial sum (C * W) per received segment, segments in arrival order."""
    rows_per = weight_NDc.shape[0] // C
    dev = ids_Z.device
    sender_Z = torch.arange(len(in_e), device=dev).repeat_interleave(torch.tensor(in_e, device=dev))
    base = torch.cumsum(torch.tensor(in_s, device=dev), 0) - torch.tensor(in_s, device=dev)
    seg_Z = torch.div(ids_Z, rows_per, rounding_mode="floor") + base[sender_Z]
    row_Z = ids_Z % rows_per
    Y, Z = sum(in_s), ids_Z.shape[0]
    sizes_Y = torch.bincount(seg_Z, minlength=Y)
    starts_Y = torch.cumsum(sizes_Y, 0) - sizes_Y
    # One embedding_bag over (chunk, segment) bags: chunk c of row i is storage row i * C + c.
    idx_CZ = row_Z.unsqueeze(0) * C + torch.arange(C, device=dev).unsqueeze(1)
    offsets = (starts_Y.unsqueeze(0) + Z * torch.arange(C, device=dev).unsqueeze(1)).reshape(-1)
    out = F.embedding_bag(idx_CZ.reshape(-1), weight_NDc, offsets, mode="sum",
                          per_sample_weights=w_ZC.t().reshape(-1))
    return out.view(C, Y, weight_NDc.shape[1]).transpose(0, 1).reshape(Y, C * weight_NDc.shape[1])
