"""Triton kernels of the two TDQKR search stages (references: `ops.search`).

Shape legend as in `search.py`: S sides, N tokens, Dk key width, H heads, R rank, P keys per side,
Q stage-1 candidates (m1), M kept (m); QP, MP their next powers of two.

Top-k inside a kernel: a score and its index are packed into one int64 whose order is the
score's order (the float's bits made monotonic in the high word, the index in the low word), so
`tl.topk` on the packed keys returns the best entries with their indices; padding packs -inf.

- `_stage1_kernel`, one program per (16 tokens, side, head): walks the P keys in blocks, scores
  each block against the 16 queries for every rank with one `tl.dot` (fp32 inputs in IEEE
  precision, not TF32, so ranks match the reference), folds the ranks into the rank-1 proxy, and
  merges each token's block best QP into its running top-QP (join + topk along the last dim), so
  the (S, N, J) scores never reach memory. Then the winners' per-rank scores are recomputed
  from their key columns (`_rescore_winners`) and stored.
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

BLOCK_N = 16  # tokens per stage-1 program: their scores are one tl.dot (tensor cores) per key block


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
                   R: tl.constexpr, QP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
                   BLOCK_K: tl.constexpr, KC: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    s = tl.program_id(1)
    h = tl.program_id(2)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < Dk
    q = tl.load(Q_PTR + (offs_n[:, None] * 2 + s) * Dk + offs_k[None, :],
                mask=mask_n[:, None] & mask_k[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    key_base = KEYS + s.to(tl.int64) * Dk * J
    best = tl.full((BLOCK_N, QP), -(2 ** 63), dtype=tl.int64)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        proxy = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
        for r in tl.static_range(R):
            col = (h * R + r) * P + offs_p
            k = tl.load(key_base + offs_k[:, None].to(tl.int64) * J + col[None, :],
                        mask=mask_k[:, None] & mask_p[None, :], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            if IEEE:
                score = tl.dot(q, k, input_precision="ieee")
            else:
                score = tl.dot(q, k)
            proxy += tl.load(UT + (s * H + h) * R + r).to(tl.float32) * score
        packed = tl.where(mask_p[None, :], _pack(proxy, offs_p[None, :]), -(2 ** 63))
        if BLOCK_P > QP:
            packed = tl.topk(packed, QP)
        best = tl.topk(tl.reshape(tl.join(best, packed), (BLOCK_N, 2 * QP)), QP)
    idx_NQ = _unpack_idx(best)
    offs_q = tl.arange(0, QP)
    mask_nq = mask_n[:, None] & (offs_q < M1)[None, :]
    out_NQ = ((s * N + offs_n) * H + h).to(tl.int64)[:, None] * M1 + offs_q[None, :]
    tl.store(CAND + out_NQ, idx_NQ.to(tl.int64), mask=mask_nq)
    _rescore_winners(Q_PTR, key_base, CSC, idx_NQ, offs_n, mask_nq, s, h, N, H, P, J, Dk, M1,
                     R, QP, BLOCK_N, BLOCK_K, KC)


@triton.jit
def _rescore_winners(Q_PTR, key_base, CSC, idx_NQ, offs_n, mask_nq, s, h, N, H, P, J, Dk, M1,
                     R: tl.constexpr, QP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     KC: tl.constexpr):
    """Per-rank scores of each token's winners from their key columns, Dk in chunks of KC."""
    offs_q = tl.arange(0, QP)
    for r in tl.static_range(R):
        col_NQ = (h * R + r) * P + idx_NQ
        acc = tl.zeros((BLOCK_N, QP), dtype=tl.float32)
        for k0 in tl.static_range(0, BLOCK_K, KC):
            offs_c = k0 + tl.arange(0, KC)
            mask_c = offs_c < Dk
            qc = tl.load(Q_PTR + (offs_n[:, None] * 2 + s) * Dk + offs_c[None, :],
                         mask=(offs_n < N)[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
            kc = tl.load(key_base + offs_c[None, None, :].to(tl.int64) * J + col_NQ[:, :, None],
                         mask=mask_nq[:, :, None] & mask_c[None, None, :], other=0.0).to(tl.float32)
            acc += tl.sum(kc * qc[:, None, :], axis=2)
        out = (((s * N + offs_n) * H + h) * R + r).to(tl.int64)[:, None] * M1 + offs_q[None, :]
        tl.store(CSC + out, acc.to(CSC.dtype.element_ty), mask=mask_nq)


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
        BK = max(triton.next_power_of_2(Dk), 16)  # tl.dot needs >= 16 on a GPU
        # The CPU interpreter pays per element: no padding tokens there.
        BN = BLOCK_N if q_NSK.is_cuda else min(BLOCK_N, triton.next_power_of_2(N))
        _stage1_kernel[(triton.cdiv(N, BN), S, H)](
            q_NSK.contiguous(), keys_SKJ.to(q_NSK.dtype).contiguous(), ut_SHR.float().contiguous(), cand,
            scores, N, H, P, J, Dk, m1, R=R, QP=QP, BLOCK_N=BN, BLOCK_P=BP, BLOCK_K=BK, KC=min(BK, 32),
            IEEE=q_NSK.dtype == torch.float32 or not q_NSK.is_cuda,
            UPCAST=not q_NSK.is_cuda)  # the interpreter's bf16/fp16 tl.dot is wrong (triton 3.9)
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
