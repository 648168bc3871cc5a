"""Triton kernels against their torch references, forward and backward, over small hypothesis grids.

Without a GPU the kernels run on CPU under TRITON_INTERPRET=1 (set here, before triton is
imported); with one they run on CUDA. The interpreter is slow: the grids are small on purpose.
"""

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed (pip install 'ultramem[triton]')")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ultramem import UltraMemConfig, UltraMemLayer  # noqa: E402
from ultramem.ops import dispatch  # noqa: E402
from ultramem.ops.pooling import pool_reference  # noqa: E402
from ultramem.ops.search import grid_topm_reference, stage1_topk_reference, summed_grid  # noqa: E402
from ultramem.ops.triton_pool import pool_triton  # noqa: E402
from ultramem.ops.triton_topk import grid_topm_triton, stage1_topk_triton  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Relative tolerance (of the largest reference magnitude) per table dtype: fp32 accumulation in
# the kernel, the output rounded once to the table's dtype.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    err = (got.float() - want.float()).abs().max().item() if got.numel() else 0.0
    scale = want.float().abs().max().item() if want.numel() else 0.0
    assert err <= TOL[dtype] * (scale + 1.0), f"max error {err} at scale {scale} ({dtype})"


@SETTINGS
@given(T=st.integers(1, 4), K=st.integers(1, 20), G=st.sampled_from([1, 2, 4]), C=st.sampled_from([1, 2]),
       D=st.sampled_from([8, 24, 264]), dtype=st.sampled_from(list(DTYPES.values())),
       mode=st.sampled_from(["atomic", "deterministic", "sparse"]), seed=st.integers(0, 2 ** 16))
def test_pool_matches_reference(T, K, G, C, D, dtype, mode, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = 7  # few rows: tokens share rows, so the table gradient sums several contributions
    table = torch.randn(rows * C, D, generator=gen).to(dtype).to(DEVICE).requires_grad_()
    row_TK = torch.randint(0, rows, (T, K), generator=gen).to(DEVICE)
    bag_TK = torch.randint(0, G, (T, K), generator=gen).to(DEVICE) if G > 1 else None
    w_TKC = torch.randn(T, K, C, generator=gen).to(DEVICE).requires_grad_()
    out = pool_triton(table, row_TK, bag_TK, w_TKC, G, sparse=mode == "sparse",
                      deterministic=mode == "deterministic")
    assert out.dtype == dtype and out.shape == (T, G, C, D)
    table_ref = table.detach().float().requires_grad_()
    w_ref = w_TKC.detach().clone().requires_grad_()
    ref = pool_reference(table_ref, row_TK, bag_TK, w_ref, G)
    close(out, ref, dtype)
    g = torch.randn(ref.shape, generator=gen).to(DEVICE)
    (out.float() * g).sum().backward()
    (ref * g).sum().backward()
    assert table.grad.is_sparse == (mode == "sparse")
    d_table = table.grad.to_dense() if table.grad.is_sparse else table.grad
    assert d_table.dtype == dtype
    close(d_table, table_ref.grad, dtype)
    close(w_TKC.grad, w_ref.grad, dtype)


def test_pool_deterministic_mode_is_bitwise_repeatable():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(3 * 2, 16, generator=gen).to(DEVICE).requires_grad_()
    row_TK = torch.randint(0, 3, (6, 16), generator=gen).to(DEVICE)  # 96 reads of 3 rows
    bag_TK = torch.randint(0, 4, (6, 16), generator=gen).to(DEVICE)
    w_TKC = torch.randn(6, 16, 2, generator=gen).to(DEVICE)
    grads = []
    for _ in range(2):
        table.grad = None
        pool_triton(table, row_TK, bag_TK, w_TKC, 4, deterministic=True).pow(2).sum().backward()
        grads.append(table.grad.clone())
    assert torch.equal(grads[0], grads[1])
    with torch.no_grad():  # forward only under no_grad: no autograd graph, same numbers
        ref = pool_reference(table, row_TK, bag_TK, w_TKC, 4)
        close(pool_triton(table, row_TK, bag_TK, w_TKC, 4), ref, torch.float32)


def test_pool_in_a_layer_matches_embedding_bag(monkeypatch):
    """The kernel in place of the torch pool inside a real UltraMemLayer (IVE bags, MCS chunks)."""
    torch.manual_seed(0)
    cfg = UltraMemConfig(dim=32, num_keys=4, key_dim=8, value_dim=16, topk=4, stage1_topk=4,
                         value_expansion=4, num_cores=2)
    layer = UltraMemLayer(cfg).to(DEVICE)
    x = torch.randn(2, 3, 32, device=DEVICE)
    ref = layer(x)
    ref.square().sum().backward()
    want = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad()
    kernel = dispatch.Impl("triton-test", pool_triton, lambda _t: True)
    monkeypatch.setitem(dispatch._REGISTRY, "pool", [kernel])
    assert dispatch.select("pool", layer.values.weight).name == "triton-test"
    got = layer(x)
    got.square().sum().backward()
    close(got, ref, torch.float32)
    for name, grad in want.items():
        close(dict(layer.named_parameters())[name].grad, grad, torch.float32)


@SETTINGS
@given(N=st.integers(1, 2), Dk=st.sampled_from([8, 24]), H=st.sampled_from([1, 2]), R=st.sampled_from([1, 2]),
       P=st.integers(4, 150), m1=st.sampled_from([1, 4, 6]), dtype=st.sampled_from(list(DTYPES.values())),
       seed=st.integers(0, 2 ** 16))
def test_stage1_topk_matches_reference(N, Dk, H, R, P, m1, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q_NSK = torch.randn(N, 2, Dk, generator=gen).to(dtype).to(DEVICE)
    keys_SKJ = torch.randn(2, Dk, H * R * P, generator=gen).to(dtype).to(DEVICE)
    ut_SHR = torch.randn(2, H, R, generator=gen).to(DEVICE)
    cand_SNHQ, sc_SNHRQ = stage1_topk_triton(q_NSK, keys_SKJ, ut_SHR, m1)
    assert cand_SNHQ.shape == (2, N, H, m1) and sc_SNHRQ.shape == (2, N, H, R, m1)
    assert (cand_SNHQ.sort(-1).values.diff(dim=-1) > 0).all()  # distinct keys
    # The oracle in fp32: full score matrix, proxy; the kernel's candidates must carry the top-m1
    # proxy values (ties and rounding may pick other indices of equal value).
    ref_cand, _ = stage1_topk_reference(q_NSK.float(), keys_SKJ.float(), ut_SHR, m1)
    s_SNHRP = torch.einsum("nsk,skj->snj", q_NSK.float(), keys_SKJ.float()).view(2, N, H, R, P)
    proxy_SNHP = torch.einsum("shr,snhrp->snhp", ut_SHR, s_SNHRP)
    got = proxy_SNHP.gather(-1, cand_SNHQ).sort(-1).values
    close(got, proxy_SNHP.gather(-1, ref_cand).sort(-1).values, dtype)
    want_sc = s_SNHRP.gather(-1, cand_SNHQ.unsqueeze(-2).expand(2, N, H, R, m1))
    close(sc_SNHRQ, want_sc, dtype)


@SETTINGS
@given(X=st.integers(1, 3), H=st.sampled_from([1, 2]), R=st.sampled_from([1, 2, 3]),
       Q=st.sampled_from([2, 5, 8]), frac=st.floats(0.05, 1.0), additive=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_grid_topm_matches_reference(X, H, R, Q, frac, additive, seed):
    gen = torch.Generator().manual_seed(seed)
    R = 1 if additive else R
    m = max(1, int(frac * Q * Q))
    sr = torch.randn(X, H, R, Q, generator=gen).to(DEVICE)
    sc = torch.randn(X, H, R, Q, generator=gen).to(DEVICE)
    core = None if additive else torch.rand(H, R, R, generator=gen).to(DEVICE)
    got = grid_topm_triton(sr, sc, core, m)
    want = grid_topm_reference(sr, sc, core, m)
    assert got.shape == want.shape == (X, H, m)
    grid = summed_grid(sr, sc, core).flatten(-2)
    assert (got.sort(-1).values.diff(dim=-1) > 0).all()
    close(grid.gather(-1, got), grid.gather(-1, want), torch.float32)  # best first, same values


def test_search_kernels_in_a_layer_match_the_full_path(monkeypatch):
    """The stage-1 and grid kernels in place of the CPU search inside a real layer (eval, no grad)."""
    torch.manual_seed(0)
    cfg = UltraMemConfig(dim=32, num_keys=6, key_dim=8, value_dim=16, topk=4, stage1_topk=4)
    layer = UltraMemLayer(cfg).to(DEVICE).eval()
    x = torch.randn(2, 3, 32, device=DEVICE)
    full = layer.retrieve(x)  # grad enabled: the full score matrix and the torch search
    for op, fn in (("stage1_topk", lambda q, k, ut, m1, cache=None: stage1_topk_triton(q, k, ut, m1)),
                   ("grid_topm", grid_topm_triton)):
        monkeypatch.setitem(dispatch._REGISTRY, op, [dispatch.Impl("triton-test", fn, lambda _t: True)])
    with torch.no_grad():
        fast = layer.retrieve(x)
    assert torch.equal(fast.indices, full.indices)
    close(fast.scores, full.scores.detach(), torch.float32)
