"""The fused embedding_bag pooling against the gather-and-sum oracle, forward and backward."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ultramem.values import ValueTable, pool_fused, pool_reference


def naive_pool(table_NV, row_TK, bag_TK, w_TKC, num_bags):
    """Loops over every entry: the slowest, most obviously right statement of the semantics."""
    T, K = row_TK.shape
    C = w_TKC.shape[-1]
    N, V = table_NV.shape
    out = torch.zeros(T, num_bags, C, V // C, dtype=table_NV.dtype)
    chunks = table_NV.view(N, C, V // C)
    for t in range(T):
        for k in range(K):
            g = 0 if bag_TK is None else int(bag_TK[t, k])
            for c in range(C):
                out[t, g, c] += w_TKC[t, k, c] * chunks[row_TK[t, k], c]
    return out


def make_case(T, K, G, C, D, N, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(N * C, D, generator=gen, dtype=dtype)
    row = torch.randint(0, N, (T, K), generator=gen)
    bag = torch.randint(0, G, (T, K), generator=gen) if G > 1 else None
    w = torch.randn(T, K, C, generator=gen, dtype=dtype)
    return weight, row, bag, w


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 6), K=st.integers(1, 12), G=st.sampled_from([1, 2, 4, 9]),
       C=st.sampled_from([1, 2, 4]), D=st.integers(1, 5), N=st.integers(1, 20), seed=st.integers(0, 99))
def test_fused_matches_reference_forward_backward(T, K, G, C, D, N, seed):
    weight, row, bag, w = make_case(T, K, G, C, D, N, seed)
    grad_out = torch.randn(T, G, C, D, dtype=weight.dtype, generator=torch.Generator().manual_seed(seed + 1))
    results = []
    for fn in (pool_fused, pool_reference):
        wt = weight.clone().requires_grad_()
        ws = w.clone().requires_grad_()
        out = fn(wt, row, bag, ws, G)
        out.backward(grad_out)
        results.append((out.detach(), wt.grad, ws.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)
    expected = naive_pool(weight.view(N, C * D), row, bag, w, G)
    torch.testing.assert_close(results[0][0], expected)


@pytest.mark.parametrize("impl", [pool_fused, pool_reference])
def test_sparse_gradient_equals_dense(impl):
    weight, row, bag, w = make_case(5, 7, 4, 2, 3, 11, seed=3)
    grads = []
    for sparse in (False, True):
        wt = weight.clone().requires_grad_()
        impl(wt, row, bag, w, 4, sparse=sparse).pow(2).sum().backward()
        grads.append(wt.grad)
    assert not grads[0].is_sparse and grads[1].is_sparse
    torch.testing.assert_close(grads[1].to_dense(), grads[0])
    # Only the rows that were read carry gradient.
    touched = torch.zeros(11 * 2, dtype=torch.bool)
    touched[(row.unsqueeze(-1) * 2 + torch.arange(2)).reshape(-1)] = True
    assert torch.all(grads[0][~touched] == 0)
    assert grads[1].coalesce().indices().unique().numel() == int(touched.sum())


def test_gradcheck_fused_pool():
    weight, row, bag, w = make_case(3, 6, 4, 2, 2, 5, seed=7)
    weight.requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: pool_fused(a, row, bag, b, 4), (weight, w))


def test_empty_bags_are_zero_and_duplicates_add():
    weight = torch.arange(12.0).view(6, 2)  # N=3 rows, C=2 chunks of width 2
    row = torch.tensor([[1, 1, 2]])
    bag = torch.tensor([[2, 2, 2]])
    w = torch.ones(1, 3, 2)
    out = pool_fused(weight, row, bag, w, 3)
    assert torch.all(out[0, :2] == 0)
    # chunk c of row i is storage row i*2 + c
    torch.testing.assert_close(out[0, 2, 0], 2 * weight[2] + weight[4])
    torch.testing.assert_close(out[0, 2, 1], 2 * weight[3] + weight[5])


def test_value_table_pool_shapes_and_errors():
    table = ValueTable(10, 8, num_chunks=2)
    torch.nn.init.normal_(table.weight)
    row = torch.randint(0, 10, (4, 5))
    out = table.pool(row, torch.randint(0, 3, (4, 5)), torch.randn(4, 5, 2), 3)
    assert out.shape == (4, 3, 8)
    assert table.rows().shape == (10, 8)
    with pytest.raises(ValueError, match="impl"):
        table.pool(row, None, torch.randn(4, 5, 2), 1, impl="triton")
    with pytest.raises(ValueError, match="num_chunks"):
        ValueTable(10, 7, num_chunks=2)


def test_read_counts_tally_training_reads_only():
    table = ValueTable(6, 4, num_chunks=2)
    torch.nn.init.normal_(table.weight)
    rows = torch.tensor([[0, 2, 2], [5, 0, 1]])
    w = torch.rand(2, 3, 2)
    with pytest.raises(RuntimeError, match="count_reads"):
        table.take_read_counts()
    table.count_reads(True)
    table.pool(rows, None, w)
    table.eval()
    table.pool(rows, None, w)  # evaluation reads are not training reads
    table.train()
    assert table.take_read_counts().tolist() == [2, 1, 2, 0, 0, 1]
    assert table.take_read_counts().tolist() == [0] * 6  # restarted
    table.count_reads(False)
    assert table.read_counts is None
