"""Fused value lookup in Triton: IVE bags, MCS chunks and per-slot weights in one kernel.

Three layers, as in scattermoe: the kernels (`_pool_fwd_kernel`, `_pool_bwd_kernel`,
`_segment_sum_kernel`), the autograd Function (`PoolFunction`) and the op (`pool_triton`, registered
for CUDA tensors by `ops.triton_registry`). The reference is `ops.pooling.pool_reference`.

Shape legend (as in `pooling.py`): T tokens, K kept entries per token, G bags per token (IVE
blocks), C chunks (MCS cores), Dc chunk width, N storage rows (physical rows * C), Z = T*K*C
(token, entry, chunk) triples, U distinct storage rows among them.

    out_TGCDc[t, g, c] = sum over k with bag_TK[t, k] == g of  w_TKC[t, k, c] * W[row_TK[t, k] * C + c]

Forward: one program per (token, bag, chunk, Dc block); it walks the token's K entries and loads
only the table rows of its bag (masked loads), so every kept row is read from memory once,
accumulating in fp32 whatever the table dtype (fp32 / bf16 / fp16). The output has the table's
dtype.

Backward, both gradients from one pass over the kept rows:
- weights: dw_TKC[t, k, c] = <dout[t, bag, c], W[row * C + c]> (fp32 accumulation, no atomics);
- table, dense: fp32 atomic adds of w * dout into an (N, Dc) buffer (fast; the summation order of
  rows read by several tokens varies from run to run);
- table, deterministic (`deterministic=True`, or torch.use_deterministic_algorithms) or sparse:
  the Z triples are sorted by storage row and each distinct row's contributions summed in a
  fixed order by one program (`_segment_sum_kernel`); a sparse table (sparse=True) gets a
  coalesced sparse COO gradient of those U rows, a dense one gets them scattered into zeros.

The kernels run on CPU tensors under TRITON_INTERPRET=1 (the tests' setting); the dispatch
predicate stays CUDA-only.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCK_K = 16


@triton.jit
def _pool_fwd_kernel(W, ROW, BAG, WT, OUT, K, G, C, D,
                     HAS_BAG: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    gc = tl.program_id(1)
    g = gc // C
    c = gc % C
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        if HAS_BAG:
            mask_k = mask_k & (tl.load(BAG + t * K + offs_k, mask=mask_k, other=-1) == g)
        row = tl.load(ROW + t * K + offs_k, mask=mask_k, other=0).to(tl.int64)
        w = tl.load(WT + (t * K + offs_k) * C + c, mask=mask_k, other=0.0).to(tl.float32)
        v = tl.load(W + (row * C + c)[:, None] * D + offs_d[None, :],
                    mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(v * w[:, None], axis=0)
    out_row = ((t * G + g) * C + c).to(tl.int64)
    tl.store(OUT + out_row * D + offs_d, acc.to(OUT.dtype.element_ty), mask=mask_d)


@triton.jit
def _pool_bwd_kernel(W, ROW, BAG, WT, DOUT, DTAB, DWT, K, G, C, D,
                     HAS_BAG: tl.constexpr, ATOMIC: tl.constexpr, NEED_DWT: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    c = tl.program_id(1)
    offs_k = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    row = tl.load(ROW + t * K + offs_k, mask=mask_k, other=0).to(tl.int64)
    bag = tl.zeros((BLOCK_K,), dtype=tl.int64)
    if HAS_BAG:
        bag = tl.load(BAG + t * K + offs_k, mask=mask_k, other=0).to(tl.int64)
    w = tl.load(WT + (t * K + offs_k) * C + c, mask=mask_k, other=0.0).to(tl.float32)
    src = ((t * G + bag) * C + c) * D
    dst = (row * C + c) * D
    dwt = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_k[:, None] & (offs_d < D)[None, :]
        g = tl.load(DOUT + src[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        if NEED_DWT:
            v = tl.load(W + dst[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
            dwt += tl.sum(g * v, axis=1)
        if ATOMIC:
            tl.atomic_add(DTAB + dst[:, None] + offs_d[None, :], g * w[:, None], mask=mask)
    if NEED_DWT:
        tl.store(DWT + (t * K + offs_k) * C + c, dwt.to(DWT.dtype.element_ty), mask=mask_k)


@triton.jit
def _segment_sum_kernel(DOUT, SRC, WE, STARTS, OUT, D, BLOCK_D: tl.constexpr):
    """OUT[u] = sum over e in [STARTS[u], STARTS[u+1]) of WE[e] * DOUT[SRC[e]], in order e."""
    u = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    start = tl.load(STARTS + u)
    end = tl.load(STARTS + u + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for e in range(start, end):
        src = tl.load(SRC + e).to(tl.int64)
        w = tl.load(WE + e).to(tl.float32)
        acc += w * tl.load(DOUT + src * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    tl.store(OUT + u.to(tl.int64) * D + offs_d, acc, mask=mask_d)


def _block_d(D: int) -> int:
    return min(triton.next_power_of_2(D), 256)


def _check_launchable(weight_NDc: torch.Tensor) -> None:
    if weight_NDc.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"weight: the Triton pool runs on CUDA tensors, or on CPU under "
                         f"TRITON_INTERPRET=1 (got device {weight_NDc.device})")


def pool_forward(weight_NDc, row_TK, bag_TK, w_TKC, num_bags: int) -> torch.Tensor:
    """(T, G, C, D) pooled chunks in the table's dtype (no autograd)."""
    _check_launchable(weight_NDc)
    T, K = row_TK.shape
    C, D = w_TKC.shape[-1], weight_NDc.shape[-1]
    G = num_bags if bag_TK is not None else 1
    out = weight_NDc.new_empty(T, G, C, D)
    if T == 0 or K == 0:
        return out.zero_()
    BD = _block_d(D)
    bag = bag_TK.contiguous() if bag_TK is not None else row_TK
    _pool_fwd_kernel[(T, G * C, triton.cdiv(D, BD))](
        weight_NDc, row_TK.contiguous(), bag, w_TKC.contiguous(), out, K, G, C, D,
        HAS_BAG=bag_TK is not None, BLOCK_K=BLOCK_K, BLOCK_D=BD)
    return out


def pool_backward(weight_NDc, row_TK, bag_TK, w_TKC, dout_TGCDc, need_table: bool, need_w: bool,
                  sparse: bool, deterministic: bool):
    """(grad of the table: dense, sparse COO or None; grad of w_TKC or None)."""
    T, K = row_TK.shape
    C, D = w_TKC.shape[-1], weight_NDc.shape[-1]
    G = dout_TGCDc.shape[1]
    dout = dout_TGCDc.contiguous()
    atomic = need_table and not (sparse or deterministic)
    dtab = torch.zeros(weight_NDc.shape, dtype=torch.float32, device=weight_NDc.device) if atomic else None
    dwt = torch.empty(T, K, C, dtype=w_TKC.dtype, device=w_TKC.device) if need_w else None
    if (atomic or need_w) and T * K > 0:
        BD = _block_d(D)
        bag = bag_TK.contiguous() if bag_TK is not None else row_TK
        _pool_bwd_kernel[(T, C, triton.cdiv(K, BLOCK_K))](
            weight_NDc, row_TK.contiguous(), bag, w_TKC.contiguous(), dout, dtab, dwt, K, G, C, D,
            HAS_BAG=bag_TK is not None, ATOMIC=atomic, NEED_DWT=need_w, BLOCK_K=BLOCK_K, BLOCK_D=BD)
    if need_w and T * K == 0:
        dwt.zero_()
    if atomic:
        return dtab.to(weight_NDc.dtype), dwt
    if not need_table:
        return None, dwt
    return _table_grad_by_row(weight_NDc, row_TK, bag_TK, w_TKC, dout, sparse), dwt


def _table_grad_by_row(weight_NDc, row_TK, bag_TK, w_TKC, dout_TGCDc, sparse: bool) -> torch.Tensor:
    """The table gradient summed per distinct storage row in a fixed order (sort + segment sum)."""
    T, K = row_TK.shape
    C, D = w_TKC.shape[-1], weight_NDc.shape[-1]
    G = dout_TGCDc.shape[1]
    chunk_C = torch.arange(C, device=row_TK.device)
    dst_Z = (row_TK.unsqueeze(-1) * C + chunk_C).reshape(-1)
    bag = bag_TK if bag_TK is not None else torch.zeros_like(row_TK)
    tok_T1 = torch.arange(T, device=row_TK.device).unsqueeze(-1)
    src_Z = (((tok_T1 * G + bag).unsqueeze(-1)) * C + chunk_C).reshape(-1)
    order_Z = torch.argsort(dst_Z, stable=True)
    rows_U, counts_U = torch.unique_consecutive(dst_Z[order_Z], return_counts=True)
    starts = torch.zeros(rows_U.numel() + 1, dtype=torch.long, device=row_TK.device)
    torch.cumsum(counts_U, 0, out=starts[1:])
    sums_UDc = torch.empty(rows_U.numel(), D, dtype=torch.float32, device=weight_NDc.device)
    if rows_U.numel():
        BD = _block_d(D)
        _segment_sum_kernel[(rows_U.numel(), triton.cdiv(D, BD))](
            dout_TGCDc, src_Z[order_Z].contiguous(), w_TKC.reshape(-1)[order_Z].contiguous(), starts,
            sums_UDc, D, BLOCK_D=BD)
    sums_UDc = sums_UDc.to(weight_NDc.dtype)
    if sparse:
        return torch.sparse_coo_tensor(rows_U.unsqueeze(0), sums_UDc, weight_NDc.shape, is_coalesced=True,
                                       check_invariants=False)
    return torch.zeros_like(weight_NDc).index_copy_(0, rows_U, sums_UDc)


class PoolFunction(torch.autograd.Function):
    """Autograd around the fused lookup: gradients for the table and the per-slot weights."""

    @staticmethod
    def forward(ctx, weight_NDc, row_TK, bag_TK, w_TKC, num_bags, sparse, deterministic):
        ctx.save_for_backward(weight_NDc, row_TK, bag_TK, w_TKC)
        ctx.sparse, ctx.deterministic = sparse, deterministic
        return pool_forward(weight_NDc, row_TK, bag_TK, w_TKC, num_bags)

    @staticmethod
    def backward(ctx, dout_TGCDc):
        weight_NDc, row_TK, bag_TK, w_TKC = ctx.saved_tensors
        need_table, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        d_table, d_w = pool_backward(weight_NDc, row_TK, bag_TK, w_TKC, dout_TGCDc, need_table, need_w,
                                     ctx.sparse, ctx.deterministic)
        return d_table, None, None, d_w, None, None, None


def pool_triton(weight_NDc: torch.Tensor, row_TK: torch.Tensor, bag_TK: torch.Tensor | None,
                w_TKC: torch.Tensor, num_bags: int = 1, sparse: bool = False,
                deterministic: bool | None = None) -> torch.Tensor:
    """(T, G, C, D) pooled chunks (same semantics as `pool_reference`), differentiable in the table
    and in w_TKC. deterministic: None follows torch.are_deterministic_algorithms_enabled()."""
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if bag_TK is None or num_bags == 1:
        bag_TK, num_bags = None, 1
    return PoolFunction.apply(weight_NDc, row_TK, bag_TK, w_TKC, num_bags, bool(sparse), bool(deterministic))
