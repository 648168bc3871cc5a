"""UltraMemLayer and PKMLayer end to end: IVE, MCS, paths, state, determinism, errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ultramem import PKMConfig, PKMLayer, UltraMemConfig, UltraMemLayer


def small_cfg(**kw):
    base = dict(dim=24, num_keys=4, key_dim=8, value_dim=8, heads=2, topk=6, tucker_rank=2,
                num_cores=2, value_expansion=4)
    base.update(kw)
    return UltraMemConfig(**base)


def expanded_virtual_output(layer, x, softmax=False):
    """Output computed from an explicitly expanded virtual table in output space:
    row v, core c of the virtual table is W_o[block(v), chunk c] @ V[phys(v), chunk c].
    softmax: each head's m kept scores softmaxed per core first (UltraMemConfig.softmax)."""
    cfg = layer.cfg
    E, N, V, C, D = cfg.value_expansion, cfg.num_values, cfg.v_dim, cfg.num_cores, cfg.out_dim
    dc = V // C
    table = layer.values.rows().view(N, C, dc)
    w_o = layer.w_o.weight.view(D, E, C, dc)
    virtual = torch.empty(E * N, C, D, dtype=table.dtype)
    for v in range(E * N):
        p = int(layer.perm[v])
        g, i = divmod(p, N)
        for c in range(C):
            virtual[v, c] = w_o[:, g, c] @ table[i, c]
    r = layer.retrieve(x)
    scores = r.scores.softmax(dim=3) if softmax else r.scores
    B, T = x.shape[:2]
    out = torch.zeros(B, T, D, dtype=table.dtype)
    for b in range(B):
        for t in range(T):
            for hd in range(cfg.heads):
                for j in range(cfg.topk):
                    v = int(r.indices[b, t, hd, j])
                    for c in range(C):
                        out[b, t] += scores[b, t, hd, j, c] * virtual[v, c]
    return out


@pytest.mark.parametrize("E,C", [(1, 1), (4, 2), (9, 1), (4, 4)])
def test_ive_and_mcs_equal_an_explicitly_expanded_table(E, C):
    torch.manual_seed(E + C)
    layer = UltraMemLayer(small_cfg(value_expansion=E, num_cores=C)).double()
    x = torch.randn(2, 3, 24, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expanded_virtual_output(layer, x))


def test_softmax_option_normalises_each_heads_kept_scores_per_core():
    """softmax=True equals the expanded table with each head's m kept scores softmaxed per core;
    the default (the paper's raw scores) differs on the same weights; gradients check in float64."""
    torch.manual_seed(3)
    layer = UltraMemLayer(small_cfg(softmax=True, value_expansion=4, num_cores=2)).double()
    x = torch.randn(2, 3, 24, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expanded_virtual_output(layer, x, softmax=True))
        raw = UltraMemLayer(small_cfg(value_expansion=4, num_cores=2)).double()
        raw.load_state_dict(layer.state_dict())
        assert not torch.allclose(raw(x), layer(x))
    xg = torch.randn(1, 2, 24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t), (xg,), eps=1e-6, atol=1e-5)


def test_mcs_weights_each_chunk_by_its_own_core():
    torch.manual_seed(0)
    layer = UltraMemLayer(small_cfg(num_cores=2, value_expansion=1))
    x = torch.randn(1, 2, 24)
    with torch.no_grad():
        layer.retrieval.cores[:, 1].zero_()  # core 1 scores every slot 0: chunk 1 must vanish
        layer.refresh_tucker()
        out = layer(x)
        w = layer.w_o.weight.clone()
        layer.w_o.weight[:, 4:].zero_()  # drop chunk 1's columns of W_o: nothing may change
        torch.testing.assert_close(layer(x), out)
        layer.w_o.weight.copy_(w)
        layer.w_o.weight[:, :4].zero_()
        assert layer(x).abs().max() == 0


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 4), E=st.sampled_from([1, 4, 9]), C=st.sampled_from([1, 2]),
       H=st.integers(1, 3), m=st.integers(1, 8), seed=st.integers(0, 20))
def test_fused_and_reference_layers_agree_forward_backward(B, T, E, C, H, m, seed):
    torch.manual_seed(seed)
    cfg = small_cfg(value_expansion=E, num_cores=C, heads=H, topk=m)
    fused = UltraMemLayer(cfg).double()
    ref = UltraMemLayer(cfg.replace(lookup="reference")).double()
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(B, T, 24, dtype=torch.float64)
    outs = []
    for layer in (fused, ref):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        outs.append((y.detach(), xi.grad, {n: p.grad for n, p in layer.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])
    for name, g in outs[0][2].items():
        torch.testing.assert_close(g, outs[1][2][name], msg=name)


def test_layer_gradcheck_float64():
    torch.manual_seed(1)
    layer = UltraMemLayer(small_cfg()).double()
    x = torch.randn(1, 2, 24, dtype=torch.float64, requires_grad=True)
    # Selection is piecewise constant; tiny perturbations (eps=1e-6) do not move it.
    assert torch.autograd.gradcheck(lambda inp: layer(inp), (x,), eps=1e-6, atol=1e-5)


def test_sparse_value_gradients():
    torch.manual_seed(2)
    dense = UltraMemLayer(small_cfg())
    sparse = UltraMemLayer(small_cfg(sparse_values=True))
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(2, 3, 24)
    dense(x).sum().backward()
    sparse(x).sum().backward()
    g = sparse.values.weight.grad
    assert g.is_sparse
    torch.testing.assert_close(g.to_dense(), dense.values.weight.grad)


def test_state_dict_round_trip_includes_perm_and_singular_vectors():
    torch.manual_seed(3)
    a = UltraMemLayer(small_cfg())
    torch.manual_seed(4)
    b = UltraMemLayer(small_cfg())
    assert not torch.equal(a.perm, b.perm)
    sd = a.state_dict()
    assert {"perm", "retrieval.u", "retrieval.t"} <= set(sd)
    b.load_state_dict(sd)
    assert torch.equal(a.perm, b.perm) and torch.equal(a.retrieval.u, b.retrieval.u)
    x = torch.randn(2, 3, 24)
    torch.testing.assert_close(a(x), b(x))


def test_determinism_under_seed():
    outs = []
    for _ in range(2):
        torch.manual_seed(5)
        layer = UltraMemLayer(small_cfg(query_conv=True))
        outs.append(layer(torch.randn(2, 3, 24)))
    assert torch.equal(outs[0], outs[1])


def test_paper_value_init_variance():
    cfg = small_cfg(num_keys=32, topk=8, heads=2, depth=6, value_dim=16)
    torch.manual_seed(6)
    layer = UltraMemLayer(cfg)
    expected_var = 4 / (2 * 8 * 2 * 6)
    assert abs(layer.values.weight.var().item() / expected_var - 1) < 0.05
    assert abs(layer.w_o.weight.var().item() * 4 * 16 - 1) < 0.1
    authors = UltraMemLayer(cfg.replace(init="authors"))
    assert abs(authors.values.weight.std().item() / 0.02 - 1) < 0.05


@pytest.mark.parametrize("init", ["paper", "authors", "calibrated"])
def test_value_init_std_overrides_only_the_values(init):
    cfg = small_cfg(num_keys=32, topk=8, value_dim=16, init=init)
    torch.manual_seed(7)
    plain = UltraMemLayer(cfg)
    torch.manual_seed(7)
    scaled = UltraMemLayer(cfg.replace(value_init_std=0.3))
    assert abs(scaled.values.weight.std().item() / 0.3 - 1) < 0.05
    # Same draws, rescaled: the override consumes the RNG exactly like the init it replaces.
    ratio = scaled.values.weight / plain.values.weight
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio.flatten()[0].item()))
    for (name, a), (_, b) in zip(plain.state_dict().items(), scaled.state_dict().items(), strict=True):
        if name != "values.weight":
            assert torch.equal(a, b), name


def test_core_aux_loss():
    layer = UltraMemLayer(small_cfg(tucker_rank=3))
    assert layer.aux_loss().item() == 0
    layer = UltraMemLayer(small_cfg(tucker_rank=3, core_loss_coef=1e-3))
    with torch.no_grad():
        layer.retrieval.cores.copy_(torch.diag(torch.tensor([2.0, 1.0, 0.1])).expand(2, 2, 3, 3) / 2)
    # Summed core per head = diag(2, 1, 0.1): only lambda_2 = 1 exceeds tau = 0.15.
    expected = 2 * 1e-3 / 2 * (1.0 - 0.15) ** 2
    loss = layer.aux_loss()
    torch.testing.assert_close(loss, torch.tensor(expected))
    loss.backward()
    assert layer.retrieval.cores.grad.abs().sum() > 0
    assert layer.memory_stats()["core_sv_ratio"] == pytest.approx(0.5)


def test_forward_input_errors():
    layer = UltraMemLayer(small_cfg())
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, time, 24\), got \(2, 3, 25\)"):
        layer(torch.randn(2, 3, 25))
    with pytest.raises(ValueError, match="got \\(3, 24\\)"):
        layer(torch.randn(3, 24))
    with pytest.raises(ValueError, match="floating-point"):
        layer(torch.ones(1, 2, 24, dtype=torch.long))
    x = torch.randn(1, 2, 24)
    x[0, 1, 3] = float("nan")
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="NaN"):
        layer(x)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_output_dim_and_batch_shapes():
    layer = UltraMemLayer(small_cfg(dim_out=10))
    assert layer(torch.randn(3, 5, 24)).shape == (3, 5, 10)
    assert layer(torch.randn(1, 1, 24)).shape == (1, 1, 10)


def pkm_cfg(**kw):
    base = dict(dim=16, num_keys=8, key_dim=8, heads=2, topk=4)
    base.update(kw)
    return PKMConfig(**base)


@pytest.mark.parametrize("kw", [{}, {"softmax": False}, {"memory_plus": True}, {"value_dim": 8},
                                {"query_norm": "layer"}, {"query_norm": "none"}])
def test_pkm_fast_search_is_exact_and_paths_agree(kw):
    torch.manual_seed(7)
    layer = PKMLayer(pkm_cfg(**kw)).eval()
    x = torch.randn(2, 3, 16)
    fast, exact = layer.retrieve(x), layer.retrieve(x, exact=True)
    assert torch.equal(fast.indices.sort(-1).values, exact.indices.sort(-1).values)
    if kw.get("softmax", True):
        torch.testing.assert_close(fast.scores.sum(-2), torch.ones(2, 3, 2, 1))
    ref = PKMLayer(pkm_cfg(lookup="reference", **kw)).eval()
    ref.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), ref(x))


def test_pkm_output_is_softmax_weighted_value_sum():
    torch.manual_seed(8)
    layer = PKMLayer(pkm_cfg(query_norm="none", heads=1))
    x = torch.randn(1, 1, 16)
    r = layer.retrieve(x)
    rows = layer.values.rows()[r.indices[0, 0, 0]]
    expected = (r.scores[0, 0, 0] * rows).sum(0)
    torch.testing.assert_close(layer(x)[0, 0], expected)


def test_pkm_errors():
    with pytest.raises(ValueError, match="key_dim"):
        PKMConfig(dim=16, key_dim=7)
    with pytest.raises(ValueError, match="topk"):
        PKMConfig(dim=16, num_keys=4, topk=5)
    with pytest.raises(ValueError, match="query_norm"):
        PKMConfig(dim=16, query_norm="group")
    with pytest.raises(ValueError, match="got \\(1, 2, 15\\)"):
        PKMLayer(pkm_cfg())(torch.randn(1, 2, 15))


def test_pkm_shared_query_and_key_norm():
    torch.manual_seed(9)
    layer = PKMLayer(pkm_cfg(share_query=True, key_norm=True, query_norm="rms", heads=3))
    assert layer.w_q.weight.shape == (8, 16)  # one query of key_dim for all heads
    x = torch.randn(2, 3, 16)
    q = layer._query(x)
    assert torch.equal(q[:, :, 0], q[:, :, 2])
    keys = layer._subkeys()
    rms = keys.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, 4 ** -0.5), rtol=1e-4, atol=1e-4)
    fast, exact = layer.retrieve(x), layer.retrieve(x, exact=True)
    assert torch.equal(fast.indices.sort(-1).values, exact.indices.sort(-1).values)
    layer(x).sum().backward()
    assert layer.key_gain.grad is not None and layer.key_gain.grad.abs().sum() > 0
