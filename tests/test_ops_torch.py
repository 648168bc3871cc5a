"""The torch ops of `ultramem.ops` against their references, and the one dispatch that picks them."""

import pytest
import torch

from ultramem import ops
from ultramem.ops import dispatch
from ultramem.ops.topk import blocked_topk, topk_plan


@pytest.mark.parametrize("L, k, rows", [(2048, 32, 4), (4096, 32, 3), (4472, 16, 2), (8192, 64, 2)])
def test_blocked_topk_on_long_rows_matches_torch_topk(L, k, rows):
    # the lengths the layers use it at (n' = sqrt(E) n >= 2,048 keys per side), with ties excluded
    # by construction (a permutation), so indices must agree exactly, not just values
    gen = torch.Generator().manual_seed(L + k)
    x = torch.stack([torch.randperm(L, generator=gen).float() for _ in range(rows)])
    want = x.topk(k, dim=-1, sorted=True)
    for threads in (1, 2):
        _, plan = topk_plan(L, k, rows, threads)
        got = blocked_topk(x, k, True, plan)
        assert torch.equal(got, want.indices), (plan, threads)
    assert plan, "a long row should take the blocked path, else this test checks nothing new"
    got = ops.topk_indices(x, k, sorted=False)
    assert torch.equal(got.sort(-1).values, want.indices.sort(-1).values)
    torch.testing.assert_close(x.gather(-1, got).sort(-1, descending=True).values, want.values)


def test_every_blocked_plan_is_exact():
    x = torch.randn(3, 2048)
    want = x.topk(16, dim=-1).indices.sort(-1).values
    for widths in ((2,), (4, 2), (8, 4), (16,), (32, 2)):
        assert torch.equal(blocked_topk(x, 16, False, widths).sort(-1).values, want), widths


def test_score_keys_fast_path_equals_its_reference():
    q = torch.randn(7, 2, 16)
    keys = torch.randn(2, 16, 40)
    torch.testing.assert_close(ops.score_keys_bmm(q, keys), ops.score_keys_reference(q, keys))
    loop = torch.stack([torch.stack([q[n, s] @ keys[s] for n in range(7)]) for s in range(2)])
    torch.testing.assert_close(ops.score_keys(q, keys), loop)


def test_dispatch_picks_by_device_and_force_reference_overrides():
    cpu = torch.zeros(2, 3)
    assert dispatch.select("topk", cpu).name == "blocked"
    assert dispatch.select("pool", cpu).name == "embedding_bag"
    assert dispatch.select("score_keys", cpu).name == "bmm"
    with ops.force_reference():
        assert dispatch.select("pool", cpu).name == "reference"
        assert dispatch.select("topk", cpu).name == "reference"
    assert dispatch.select("pool", cpu).name == "embedding_bag"  # restored
    with pytest.raises(KeyError, match="no op named"):
        dispatch.select("nope", cpu)


def test_force_reference_gives_the_same_layer_output():
    from ultramem import UltraMemConfig, UltraMemLayer

    torch.manual_seed(0)
    layer = UltraMemLayer(UltraMemConfig(dim=32, num_keys=8, key_dim=8, value_dim=8, topk=4))
    x = torch.randn(2, 3, 32)
    fast = layer(x)
    with ops.force_reference():
        ref = layer(x)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
