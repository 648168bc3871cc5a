import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ultramem import UltraMemConfig, UltraMemLayer
from ultramem.optim import (
    LRSchedule,
    build_optimizer,
    clip_grad_norm,
    detect_sparse_values,
    split_param_groups,
    value_lr_multiplier,
)


class TinyMem(nn.Module):
    """Embedding + RMSNorm + an UltraMem layer + tied head: every group kind appears."""

    def __init__(self, sparse=False, vocab=32, dim=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.norm = nn.RMSNorm(dim)
        self.mem = UltraMemLayer(UltraMemConfig(dim=dim, num_keys=4, key_dim=8, value_dim=8, heads=2, topk=4,
                                                sparse_values=sparse))
        self.head = nn.Linear(dim, vocab, bias=True)
        self.head.weight = self.emb.weight  # tied: must be grouped once

    def value_parameters(self):
        return self.mem.value_parameters()

    def forward(self, idx):
        x = self.emb(idx)
        return self.head(x + self.mem(self.norm(x)))


class RowTable(nn.Module):
    """A bare value table whose touched rows the test controls exactly."""

    def __init__(self, rows=10, dim=3, sparse=False):
        super().__init__()
        self.values = nn.Embedding(rows, dim, sparse=sparse)
        self.scale = nn.Parameter(torch.ones(dim))

    def value_parameters(self):
        return [self.values.weight]

    def forward(self, idx):
        return (self.values(idx) * self.scale).pow(2).sum()


def test_groups_cover_every_param_once():
    m = TinyMem()
    groups = split_param_groups(m)
    names = {g: {n for n, _ in ps} for g, ps in groups.items()}
    all_ids = [id(p) for ps in groups.values() for _, p in ps]
    assert len(all_ids) == len(set(all_ids)) == len(list(m.parameters()))
    assert [p for _, p in groups["values"]] == m.value_parameters()
    assert any(n.endswith("cores") for n in names["no_decay"])
    assert {"norm.weight", "head.bias"} <= names["no_decay"]
    assert "emb.weight" in names["decay"] and "head.weight" not in names["decay"]  # tied, once
    assert all(p.ndim >= 2 and not n.endswith("cores") for n, p in groups["decay"])
    opt = build_optimizer(m, lr=1e-3)
    assert sorted(g["name"] for g in opt.param_groups) == ["decay", "no_decay", "values"]
    assert {g["name"]: g["weight_decay"] for g in opt.param_groups}["values"] == 0.0


def test_detect_sparse_values():
    assert detect_sparse_values(TinyMem(sparse=True)) and not detect_sparse_values(TinyMem(sparse=False))
    assert build_optimizer(TinyMem(sparse=True), lr=1e-3).sparse is not None
    assert build_optimizer(TinyMem(sparse=False), lr=1e-3).sparse is None


@settings(max_examples=40, deadline=None)
@given(step=st.integers(0, 199), mult=st.floats(1.0, 12.0), frac=st.floats(0.0, 1.0),
       warmup=st.integers(0, 50))
def test_value_lr_schedule_follows_formula(step, mult, frac, warmup):
    total, base, min_ratio = 200, 3e-3, 0.1
    opt = build_optimizer(RowTable(), lr=base, total_steps=total, warmup_steps=warmup, min_lr_ratio=min_ratio,
                          value_lr_mult=mult, value_lr_decay_frac=frac)
    opt.set_step(step)
    lrs = opt.lrs()
    if step < warmup:
        f = (step + 1) / warmup
    else:
        progress = (step - warmup) / max(1, total - warmup)
        f = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    S = round(frac * total)
    m = 1 + (mult - 1) * max(0.0, 1 - step / S) if S > 0 else 1.0
    assert lrs["no_decay"] == pytest.approx(base * f, rel=1e-12)
    assert lrs["values"] == pytest.approx(base * f * m, rel=1e-12)


def test_value_multiplier_endpoints():
    assert value_lr_multiplier(0, 4.0, 50) == 4.0
    assert value_lr_multiplier(25, 4.0, 50) == 2.5
    assert value_lr_multiplier(50, 4.0, 50) == 1.0 == value_lr_multiplier(999, 4.0, 50)
    s = LRSchedule(total_steps=100, warmup_steps=10)
    assert s.factor(9) == 1.0 and s.factor(100) == pytest.approx(0.1) and s.factor(0) == 0.1


def test_schedule_errors_name_the_field():
    with pytest.raises(ValueError, match="warmup_steps"):
        LRSchedule(total_steps=10, warmup_steps=11)
    with pytest.raises(ValueError, match="lr"):
        build_optimizer(RowTable(), lr=0.0)


def _step(model, opt, idx):
    opt.zero_grad()
    model(idx).backward()
    opt.step()


def test_sparse_lazy_adam_matches_dense_on_touched_rows():
    torch.manual_seed(0)
    dense = RowTable(sparse=False)
    sparse = copy.deepcopy(dense)
    sparse.values.sparse = True
    od = build_optimizer(dense, lr=1e-2, weight_decay=0.0)
    osp = build_optimizer(sparse, lr=1e-2, weight_decay=0.0)
    assert osp.sparse is not None and od.sparse is None
    first, second = torch.tensor([1, 2, 2, 5]), torch.tensor([2, 5, 7])
    _step(dense, od, first)
    _step(sparse, osp, first)
    # step 1: untouched rows have zero moments on both paths, so everything agrees
    torch.testing.assert_close(sparse.values.weight, dense.values.weight, rtol=1e-5, atol=1e-7)
    before = sparse.values.weight.detach().clone()
    _step(dense, od, second)
    _step(sparse, osp, second)
    wd, ws = dense.values.weight.detach(), sparse.values.weight.detach()
    torch.testing.assert_close(ws[[2, 5, 7]], wd[[2, 5, 7]], rtol=1e-5, atol=1e-7)  # touched again
    torch.testing.assert_close(ws[[0, 3]], wd[[0, 3]])  # never touched: never moved
    # row 1: touched only at step 1. Dense Adam keeps moving it on momentum; lazy Adam does not.
    assert torch.equal(ws[1], before[1])
    assert not torch.allclose(wd[1], before[1])
    torch.testing.assert_close(sparse.scale, dense.scale, rtol=1e-5, atol=1e-7)


def test_real_memory_layer_sparse_first_step_matches_dense():
    torch.manual_seed(0)
    dense = TinyMem(sparse=False)
    sparse = copy.deepcopy(dense)
    sparse.mem.values.sparse = True
    idx = torch.randint(0, 32, (2, 5))
    # SparseAdam adds eps to sqrt(v) before bias correction, AdamW after it: with clipped (tiny)
    # grads that alone moves updates by ~1e-3 relative, so a tiny eps isolates the rest.
    opts = [build_optimizer(m, lr=1e-2, eps=1e-12, sparse_values=s)
            for m, s in ((dense, False), (sparse, True))]
    for m, o in zip((dense, sparse), opts, strict=True):
        o.zero_grad()
        m(idx).square().mean().backward()
    assert sparse.mem.values.weight.grad.is_sparse and not dense.mem.values.weight.grad.is_sparse
    nd, ns = clip_grad_norm(opts[0].params(), 0.5), clip_grad_norm(opts[1].params(), 0.5)
    torch.testing.assert_close(ns, nd)
    for o in opts:
        o.step()
    for (n, pd), ps in zip(dense.named_parameters(), sparse.parameters(), strict=True):
        torch.testing.assert_close(ps, pd, rtol=1e-5, atol=1e-6, msg=n)


def test_clip_grad_norm_sparse_with_duplicate_indices():
    e = nn.Embedding(6, 4, sparse=True)
    w = nn.Parameter(torch.randn(3, 3))
    e(torch.tensor([1, 1, 3, 1])).mul(torch.arange(4.0)[:, None]).sum().backward()
    (w * 2).sum().backward()
    dense_e = e.weight.grad.to_dense()
    want = torch.cat([dense_e.flatten(), w.grad.flatten()]).norm()
    assert not e.weight.grad.is_coalesced()
    total = clip_grad_norm([e.weight, w], max_norm=1.0)
    torch.testing.assert_close(total, want)
    after = torch.cat([e.weight.grad.to_dense().flatten(), w.grad.flatten()]).norm()
    torch.testing.assert_close(after, torch.tensor(1.0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(e.weight.grad.to_dense(), dense_e / want, rtol=1e-4, atol=1e-6)
    # below the threshold nothing changes
    g = w.grad.clone()
    clip_grad_norm([w], max_norm=1e9)
    assert torch.equal(w.grad, g)


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(1)
    a = RowTable(sparse=True)
    oa = build_optimizer(a, lr=1e-2, total_steps=10)
    for i in range(3):
        oa.set_step(i)
        _step(a, oa, torch.tensor([i, i + 1]))
    b = copy.deepcopy(a)
    ob = build_optimizer(b, lr=1e-2, total_steps=10)
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))
    for o, m in ((oa, a), (ob, b)):
        o.set_step(3)
        _step(m, o, torch.tensor([1, 4]))
    assert torch.equal(a.values.weight, b.values.weight) and torch.equal(a.scale, b.scale)
    dense = build_optimizer(RowTable(sparse=False), lr=1e-2)
    with pytest.raises(ValueError, match="sparse"):
        dense.load_state_dict(oa.state_dict())
