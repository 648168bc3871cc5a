import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ultramem.ffn import MoE, SwiGLU, grouped_matmul, grouped_matmul_loop


def moe_reference(moe: MoE, x_BTD: torch.Tensor):
    """Per-token oracle: route each token alone, run its k experts one by one."""
    x_ND = x_BTD.reshape(-1, moe.dim)
    probs_NE = F.softmax(x_ND @ moe.router.weight.T, dim=-1)
    outs, counts = [], torch.zeros(moe.num_experts)
    for t in range(x_ND.shape[0]):
        w_K, ids_K = probs_NE[t].topk(moe.topk)
        if moe.renormalize:
            w_K = w_K / w_K.sum()
        y_D = torch.zeros(moe.dim)
        for w, e in zip(w_K, ids_K.tolist(), strict=True):
            h = x_ND[t] @ moe.w_in[e]
            gate, up = h[: moe.hidden], h[moe.hidden:]
            y_D = y_D + w * ((F.silu(gate) * up) @ moe.w_out[e])
            counts[e] += 1
        outs.append(y_D)
    f_E = counts / counts.sum()
    aux = moe.balance_coef * moe.num_experts * (f_E * probs_NE.mean(0)).sum()
    return torch.stack(outs).reshape(x_BTD.shape), aux


def _grads(moe, x, y, aux, g):
    loss = (y * g).sum() + 10 * aux
    return torch.autograd.grad(loss, [x, moe.router.weight, moe.w_in, moe.w_out])


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(1, 5), dim=st.sampled_from([4, 6, 8]),
       hidden=st.sampled_from([4, 5, 8]), experts=st.integers(1, 6), data=st.data())
def test_moe_matches_per_token_reference(b, t, dim, hidden, experts, data):
    topk = data.draw(st.integers(1, experts))
    renorm = data.draw(st.sampled_from([None, True, False]))
    path = data.draw(st.sampled_from(["grouped", "gather", "auto"]))
    torch.manual_seed(data.draw(st.integers(0, 10_000)))
    moe = MoE(dim, hidden, experts, topk, balance_coef=0.05, renormalize=renorm)
    x = torch.randn(b, t, dim, requires_grad=True)
    g = torch.randn(b, t, dim)
    y = moe(x, path=path)
    y_ref, aux_ref = moe_reference(moe, x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(moe.aux_loss(), aux_ref, atol=1e-6, rtol=1e-5)
    got_grads, want_grads = _grads(moe, x, y, moe.aux_loss(), g), _grads(moe, x, y_ref, aux_ref, g)
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("n_tokens", [1, 2, 3, 7])
def test_decode_gather_path_equals_grouped_path(n_tokens):
    torch.manual_seed(n_tokens)
    moe = MoE(16, 12, 8, 2)
    x = torch.randn(n_tokens, 1, 16, requires_grad=True)
    g = torch.randn(n_tokens, 1, 16)
    y1, y2 = moe(x, path="gather"), moe(x, path="grouped")
    torch.testing.assert_close(y1, y2, atol=1e-6, rtol=1e-5)
    g1 = torch.autograd.grad((y1 * g).sum(), [x, moe.w_in, moe.w_out, moe.router.weight])
    g2 = torch.autograd.grad((y2 * g).sum(), [x, moe.w_in, moe.w_out, moe.router.weight])
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_auto_path_picks_gather_only_for_decode_sizes(monkeypatch):
    moe = MoE(8, 8, 4, 2, decode_max_bytes=4 * 3 * 8 * 8 * 4)  # 4 pairs of fp32 experts
    used = []
    for name in ("gather", "grouped"):
        real = getattr(MoE, f"_{name}_experts")
        monkeypatch.setattr(moe, f"_{name}_experts", lambda *a, n=name, f=real: used.append(n) or f(moe, *a))
    moe(torch.randn(2, 1, 8))  # 2 tokens * top-2 = 4 pairs
    moe(torch.randn(3, 1, 8))  # 6 pairs
    assert used == ["gather", "grouped"]


def test_balance_loss_on_hand_made_routing():
    # Router = scale * identity and one-hot tokens: token e puts prob a on expert e, b elsewhere.
    s, e_count, coef = 2.0, 4, 0.01
    moe = MoE(4, 4, e_count, 1, balance_coef=coef)
    with torch.no_grad():
        moe.router.weight.copy_(s * torch.eye(4))
    tokens = [0, 0, 1, 2]
    moe(torch.eye(4)[tokens].unsqueeze(0))
    a = math.exp(s) / (math.exp(s) + 3)
    b = 1 / (math.exp(s) + 3)
    f = [2 / 4, 1 / 4, 1 / 4, 0.0]
    p = [(2 * a + 2 * b) / 4, (a + 3 * b) / 4, (a + 3 * b) / 4, (4 * b) / 4]
    want = coef * e_count * sum(fi * pi for fi, pi in zip(f, p, strict=True))
    assert moe.aux_loss().item() == pytest.approx(want, rel=1e-6)


def test_balance_loss_is_coef_for_uniform_router():
    moe = MoE(8, 8, 6, 2, balance_coef=0.3)
    with torch.no_grad():
        moe.router.weight.zero_()
    moe(torch.randn(2, 5, 8))
    assert moe.aux_loss().item() == pytest.approx(0.3, rel=1e-6)


def test_topk1_default_keeps_raw_probability_so_router_learns():
    moe = MoE(8, 8, 4, 1, balance_coef=0.0)
    assert not moe.renormalize and MoE(8, 8, 4, 2).renormalize
    y = moe(torch.randn(3, 8))
    (grad,) = torch.autograd.grad(y.square().sum(), [moe.router.weight])
    assert grad.abs().sum() > 0


def test_record_routing_exposes_expert_ids():
    moe = MoE(8, 8, 5, 2)
    x = torch.randn(2, 3, 8)
    moe(x)
    assert moe.last_expert_ids is None
    moe.record_routing = True
    moe(x)
    _, _, ids = moe.route(x.reshape(-1, 8))
    assert torch.equal(moe.last_expert_ids, ids) and moe.last_expert_ids.shape == (6, 2)


@pytest.mark.parametrize("dim", [8, 6])  # 6 fp32 columns are not 16-byte aligned -> loop fallback
def test_grouped_matmul_matches_loop_with_empty_groups(dim):
    torch.manual_seed(0)
    counts = torch.tensor([0, 3, 0, 4, 1, 0])
    x = torch.randn(int(counts.sum()), dim, requires_grad=True)
    w = torch.randn(6, dim, 8, requires_grad=True)
    g = torch.randn(int(counts.sum()), 8)
    got = grouped_matmul(x, w, counts)
    want = torch.cat([x[:3] @ w[1], x[3:7] @ w[3], x[7:] @ w[4]])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grouped_matmul_loop(x, w, counts), want)
    ga = torch.autograd.grad((got * g).sum(), [x, w])
    gb = torch.autograd.grad((want * g).sum(), [x, w])
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b)


def test_swiglu_matches_formula():
    torch.manual_seed(0)
    ffn = SwiGLU(6, 10)
    x = torch.randn(2, 3, 6)
    gate_w, up_w = ffn.w_in.weight[:10], ffn.w_in.weight[10:]
    want = (F.silu(x @ gate_w.T) * (x @ up_w.T)) @ ffn.w_down.weight.T
    torch.testing.assert_close(ffn(x), want)
    assert sum(p.numel() for p in ffn.parameters()) == 3 * 6 * 10


@pytest.mark.parametrize("kwargs, field", [
    (dict(dim=0, hidden=4, num_experts=4, topk=2), "dim"),
    (dict(dim=4, hidden=4, num_experts=4, topk=5), "topk"),
    (dict(dim=4, hidden=4, num_experts=0, topk=1), "num_experts"),
    (dict(dim=4, hidden=4, num_experts=4, topk=2, balance_coef=-1.0), "balance_coef"),
])
def test_moe_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MoE(**kwargs)


def test_moe_bad_path():
    with pytest.raises(ValueError, match="path"):
        MoE(4, 4, 2, 1)(torch.randn(1, 4), path="loop")
