"""Triton kernels of the two TDQKR search stages (references: `ops.search`).

Shape legend as in `search.py`: S sides, N tokens, Dk key width, H heads, R rank, P keys per side,
Q stage-1 candidates (m1), M kept (m); QP, MP their next powers of two.

Top-k inside a kernel: a score and its index are packed into one int64 whose order is the
score's order (the float's bits made monotonic in the high word, the index in the low word), so
`tl.topk` on the packed keys returns the best entries with their indices; padding packs -inf.

- `_stage1_kernel`, one program per (token, side, head): walks the P keys in blocks, scores each
  block against the query for every rank, folds the ranks into the rank-1 proxy, and merges the
  block's best QP into a running top-QP (join + topk), so the (S, N, J) scores never reach
  memory. Then the winners' per-rank scores are recomputed from their key columns and stored.
- `_grid_kernel`, one program per (token, head): the Q x Q summed-core grid in registers, top-m
  of it, best first.

Both have no backward (the search runs without autograd). Registered for CUDA tensors by
`ops.triton_registry`; on CPU tensors they run under TRITON_INTERPRET=1 (the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_pool import _check_launchable


@triton.jit
def _pack(score, idx):
    """int64 keys ordered like the fp32 scores, carrying idx in the low 32 bits."""
    bits = score.to(tl.float32).to(tl.int32, bitcast=True)
    mono = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (mono.to(tl.int64) << 32) | idx.to(tl.int64)


@triton.jit
def _unpack_idx(packed):
    return (packed & 0xFFFFFFFF).to(tl.int32)


@triton.jit
def _stage1_kernel(Q_PTR, KEYS, UT, CAND, CSC, N, H, P, J, Dk, M1,
                   R: tl.constexpr, QP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    n = tl.program_id(0)
    s = tl.program_id(1)
    h = tl.program_id(2)
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < Dk
    q = tl.load(Q_PTR + (n * 2 + s) * Dk + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    key_base = KEYS + s.to(tl.int64) * Dk * J + offs_k[:, None].to(tl.int64) * J
    best = tl.full((QP,), -(2 ** 63), dtype=tl.int64)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        proxy = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for r in tl.static_range(R):
            col = (h * R + r) * P + offs_p
            k = tl.load(key_base + col[None, :], mask=mask_k[:, None] & mask_p[None, :], other=0.0)
            score = tl.sum(q[:, None] * k.to(tl.float32), axis=0)
            proxy += tl.load(UT + (s * H + h) * R + r).to(tl.float32) * score
        packed = tl.where(mask_p, _pack(proxy, offs_p), -(2 ** 63))
        if BLOCK_P > QP:
            packed = tl.topk(packed, QP)
        best = tl.topk(tl.reshape(tl.join(best, packed), (2 * QP,)), QP)
    idx = _unpack_idx(best)
    offs_q = tl.arange(0, QP)
    mask_q = offs_q < M1
    out_row = ((s * N + n) * H + h).to(tl.int64)
    tl.store(CAND + out_row * M1 + offs_q, idx.to(tl.int64), mask=mask_q)
    for r in tl.static_range(R):
        col = (h * R + r) * P + idx
        k = tl.load(key_base + col[None, :], mask=mask_k[:, None] & mask_q[None, :], other=0.0)
        score = tl.sum(q[:, None] * k.to(tl.float32), axis=0)
        tl.store(CSC + (out_row * R + r) * M1 + offs_q, score.to(CSC.dtype.element_ty), mask=mask_q)


def stage1_topk_triton(q_NSK: torch.Tensor, keys_SKJ: torch.Tensor, ut_SHR: torch.Tensor,
                       m1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cand_SNHQ, cand_SNHRQ scores) as `search.stage1_topk_reference`; candidates best first."""
    _check_launchable(q_NSK)
    N, S, Dk = q_NSK.shape
    H, R = ut_SHR.shape[1:]
    J = keys_SKJ.shape[-1]
    P = J // (H * R)
    if S != 2 or m1 > P:
        raise ValueError(f"q_NSK/m1: need 2 sides and m1 <= keys per side {P} (got S={S}, m1={m1})")
    cand = torch.empty(S, N, H, m1, dtype=torch.long, device=q_NSK.device)
    scores = torch.empty(S, N, H, R, m1, dtype=q_NSK.dtype, device=q_NSK.device)
    if N:
        QP = max(triton.next_power_of_2(m1), 2)
        BP = max(QP, min(triton.next_power_of_2(P), 128))
        _stage1_kernel[(N, S, H)](q_NSK.contiguous(), keys_SKJ.to(q_NSK.dtype).contiguous(),
                                  ut_SHR.float().contiguous(), cand, scores, N, H, P, J, Dk, m1,
                                  R=R, QP=QP, BLOCK_P=BP, BLOCK_K=triton.next_power_of_2(Dk))
    return cand, scores


@triton.jit
def _grid_kernel(SR, SC, CORE, OUT, M1, M,
                 R: tl.constexpr, ADDITIVE: tl.constexpr, QP: tl.constexpr, MP: tl.constexpr, H):
    nh = tl.program_id(0)
    h = nh % H
    offs = tl.arange(0, QP)
    mask = offs < M1
    base = nh.to(tl.int64) * R * M1
    if ADDITIVE:
        a = tl.load(SR + base + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(SC + base + offs, mask=mask, other=0.0).to(tl.float32)
        grid = a[:, None] + b[None, :]
    else:
        grid = tl.zeros((QP, QP), dtype=tl.float32)
        for r in tl.static_range(R):
            a = tl.load(SR + base + r * M1 + offs, mask=mask, other=0.0).to(tl.float32)
            tmp = tl.zeros((QP,), dtype=tl.float32)
            for s in tl.static_range(R):
                c = tl.load(CORE + (h * R + r) * R + s).to(tl.float32)
                tmp += c * tl.load(SC + base + s * M1 + offs, mask=mask, other=0.0).to(tl.float32)
            grid += a[:, None] * tmp[None, :]
    flat = offs[:, None] * M1 + offs[None, :]
    packed = tl.where(mask[:, None] & mask[None, :], _pack(grid, flat), -(2 ** 63))
    best = tl.topk(tl.reshape(packed, (QP * QP,)), MP)
    offs_m = tl.arange(0, MP)
    tl.store(OUT + nh.to(tl.int64) * M + offs_m, _unpack_idx(best).to(tl.int64), mask=offs_m < M)


def grid_topm_triton(sr_XHRQ: torch.Tensor, sc_XHRQ: torch.Tensor, core_HRR: torch.Tensor | None,
                     m: int) -> torch.Tensor:
    """Flat indices (X..., H, M) of the m best candidate pairs, best first (as the reference)."""
    _check_launchable(sr_XHRQ)
    *lead, H, R, Q = sr_XHRQ.shape
    if m > Q * Q:
        raise ValueError(f"m: must be <= Q^2={Q * Q} (got {m})")
    out = torch.empty(*lead, H, m, dtype=torch.long, device=sr_XHRQ.device)
    rows = out.numel() // max(m, 1)
    if rows:
        core = core_HRR.float().contiguous() if core_HRR is not None else sr_XHRQ.new_zeros(1)
        _grid_kernel[(rows,)](sr_XHRQ.contiguous(), sc_XHRQ.contiguous(), core, out, Q, m,
                              R=R, ADDITIVE=core_HRR is None, QP=max(triton.next_power_of_2(Q), 2),
                              MP=triton.next_power_of_2(m), H=H)
    return out
