"""The torch ops of `ultramem.ops`: dispatch, the blocked top-k, key scoring, the stage-1 search
on folded keys, and the layer's search-only (no-grad) path against its full path."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ultramem import UltraMemConfig, UltraMemLayer
from ultramem.ops import dispatch, grid_topm, score_keys, stage1_topk, topk_indices
from ultramem.ops.search import Stage1Cache, stage1_topk_folded, stage1_topk_reference
from ultramem.ops.topk import blocked_topk, topk_blocked, topk_plan
from ultramem.ops.triton_registry import on_cuda_with_triton


def test_dispatch_picks_the_cpu_fast_paths_and_force_reference_overrides():
    x = torch.zeros(4, 8)
    assert dispatch.select("pool", x).name == "embedding_bag"
    assert dispatch.select("topk", x).name == "blocked"
    assert dispatch.select("stage1_topk", x).name == "folded"
    assert dispatch.select("grid_topm", x).name == "reference"
    with dispatch.force_reference():
        for op in ("pool", "topk", "score_keys", "stage1_topk", "grid_topm"):
            assert dispatch.select(op, x).name == "reference"
    assert dispatch.select("pool", x).name == "embedding_bag"  # restored
    for op in ("pool", "stage1_topk", "grid_topm"):
        assert "triton" in dispatch.implementations(op)
    # The Triton kernels are for CUDA tensors only (CPU runs them only in tests, explicitly).
    assert not on_cuda_with_triton(x) and not on_cuda_with_triton(torch.empty(1, device="meta"))
    with pytest.raises(KeyError, match="no op named"):
        dispatch.select("nope", x)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(L=st.sampled_from([2048, 4472, 8192]), k=st.sampled_from([1, 16, 32, 64]), rows=st.integers(1, 6),
       seed=st.integers(0, 2 ** 16))
def test_blocked_topk_on_long_rows_matches_torch_topk(L, k, rows, seed):
    x = torch.randn(rows, L, generator=torch.Generator().manual_seed(seed))
    want = x.topk(k, dim=-1)
    for widths in {topk_plan(L, k, rows, 1)[1], topk_plan(L, k, rows, 2)[1], (8,), (4, 4)}:
        sizes = [L]
        for w in widths:
            sizes.append(sizes[-1] // w)
        if any(a % w or b < k for a, b, w in zip(sizes, sizes[1:], widths, strict=False)):
            continue  # not a valid plan for this row length
        got = blocked_topk(x, k, True, widths)
        assert torch.equal(got, want.indices), widths  # continuous draws: no ties
        assert torch.equal(x.gather(-1, got), want.values)
    got = topk_blocked(x, k, sorted=False)
    assert torch.equal(got.sort(-1).values, want.indices.sort(-1).values)
    assert torch.equal(topk_indices(x, k), want.indices)


def test_score_keys_matches_a_loop_over_sides_and_columns():
    gen = torch.Generator().manual_seed(0)
    q_NSK = torch.randn(5, 2, 16, generator=gen)
    keys_SKJ = torch.randn(2, 16, 40, generator=gen)
    got = score_keys(q_NSK, keys_SKJ)
    for s in range(2):
        for n in range(5):
            for j in range(40):
                want = sum(float(q_NSK[n, s, d]) * float(keys_SKJ[s, d, j]) for d in range(16))
                assert abs(float(got[s, n, j]) - want) < 1e-4


@settings(max_examples=12, deadline=None, derandomize=True)
@given(N=st.integers(1, 5), H=st.sampled_from([1, 2]), R=st.sampled_from([1, 2, 3]), P=st.integers(8, 300),
       m1=st.sampled_from([1, 4, 8]), seed=st.integers(0, 2 ** 16))
def test_stage1_on_folded_keys_matches_the_full_score_matrix(N, H, R, P, m1, seed):
    gen = torch.Generator().manual_seed(seed)
    q_NSK = torch.randn(N, 2, 16, generator=gen)
    keys_SKJ = torch.randn(2, 16, H * R * P, generator=gen)
    ut_SHR = torch.randn(2, H, R, generator=gen)
    cand, scores = stage1_topk_folded(q_NSK, keys_SKJ, ut_SHR, m1)
    ref_cand, ref_scores = stage1_topk_reference(q_NSK, keys_SKJ, ut_SHR, m1)
    assert torch.equal(cand.sort(-1).values, ref_cand.sort(-1).values)
    order, ref_order = cand.argsort(-1).unsqueeze(-2), ref_cand.argsort(-1).unsqueeze(-2)
    torch.testing.assert_close(scores.gather(-1, order.expand_as(scores)),
                               ref_scores.gather(-1, ref_order.expand_as(ref_scores)))


def test_stage1_cache_rebuilds_when_keys_or_vectors_change():
    gen = torch.Generator().manual_seed(1)
    q_NSK, keys_SKJ = torch.randn(3, 2, 8, generator=gen), torch.randn(2, 8, 2 * 2 * 20, generator=gen)
    ut_SHR = torch.randn(2, 2, 2, generator=gen)
    cache = Stage1Cache()
    first = stage1_topk(q_NSK, keys_SKJ, ut_SHR, 4, cache)
    folded = cache.folded_SKX
    assert stage1_topk(q_NSK, keys_SKJ, ut_SHR, 4, cache)[0].equal(first[0]) and cache.folded_SKX is folded
    ut2 = -ut_SHR  # other vectors: other candidates
    got = stage1_topk(q_NSK, keys_SKJ, ut2, 4, cache)
    assert cache.folded_SKX is not folded
    want = stage1_topk_reference(q_NSK, keys_SKJ, ut2, 4)[0]
    assert torch.equal(got[0].sort(-1).values, want.sort(-1).values)
    keys2 = torch.randn(2, 8, 80, generator=gen)
    got = stage1_topk(q_NSK, keys2, ut2, 4, cache)
    assert torch.equal(got[0].sort(-1).values, stage1_topk_reference(q_NSK, keys2, ut2, 4)[0].sort(-1).values)


def test_grid_topm_is_best_first():
    gen = torch.Generator().manual_seed(2)
    sr, sc = torch.randn(3, 2, 2, 6, generator=gen), torch.randn(3, 2, 2, 6, generator=gen)
    core = torch.rand(2, 2, 2, generator=gen)
    flat = grid_topm(sr, sc, core, 10)
    grid = torch.einsum("xhra,hrs,xhsb->xhab", sr, core, sc).flatten(-2)
    torch.testing.assert_close(grid.gather(-1, flat), grid.topk(10, dim=-1).values)


@pytest.mark.parametrize("kw", [{}, {"score": "additive", "tucker_rank": 1, "num_cores": 1},
                                {"query_conv": True, "value_expansion": 1}])
def test_layer_search_only_path_matches_the_full_path(kw):
    torch.manual_seed(0)
    cfg = UltraMemConfig(dim=64, num_keys=24, key_dim=16, value_dim=32, topk=8, stage1_topk=8, **kw)
    layer = UltraMemLayer(cfg).eval()
    x = torch.randn(3, 5, 64)
    with torch.no_grad():  # by shape: few tokens (decode) or long key rows
        assert layer.retrieval._search_only(False, 8) and not layer.retrieval._search_only(False, 15)
        assert not layer.retrieval._search_only(True, 1)
    assert not layer.retrieval._search_only(False, 1)  # autograd on: the full path
    layer.retrieval.search_only = True
    full = layer.retrieve(x)  # grad enabled: the full score matrix
    with torch.no_grad():
        fast = layer.retrieve(x)
        assert layer.retrieval._search_only(False, 15)
    assert torch.equal(fast.indices, full.indices)
    torch.testing.assert_close(fast.scores, full.scores.detach())
    y_full = layer(x).detach()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y_full)
        layer.retrieval.keys_row.mul_(-1.0)  # a parameter change must drop the cached layouts
        after = layer.retrieve(x)
    full_after = layer.retrieve(x)
    assert torch.equal(after.indices, full_after.indices)
