"""Bytes-per-step accounting (ultramem.bench.accounting) against hand counts."""

import pytest
import torch

from ultramem import PKMConfig, PKMLayer, UltraMemConfig, UltraMemLayer, used_rows
from ultramem.bench.accounting import (
    Recorder,
    kv_cache_bytes,
    layer_param_counts,
    match_memory,
    memory_counts,
    memory_layer_bytes,
    moe_layer_bytes,
    moe_slot_counts,
    solve_increasing,
)
from ultramem.ffn import MoE, SwiGLU
from ultramem.model import LanguageModel, LMConfig

F32 = 4


def _nbytes(params) -> int:
    return sum(p.numel() for p in params) * F32


def test_moe_hand_routing_three_distinct_experts():
    D, H, E = 8, 4, 6
    moe = MoE(D, H, E, topk=2)
    ids = torch.tensor([[0, 3], [3, 5], [0, 5], [5, 0]])  # experts {0, 3, 5}
    b = moe_layer_bytes(moe, ids)
    per_expert = (D * 2 * H + H * D) * F32  # gate|up and down projections of one expert
    assert b["distinct_experts"] == 3
    assert b["expert_weights"] == 3 * per_expert
    assert b["dense_weights"] == D * E * F32  # the router
    assert b["total"] == 3 * per_expert + D * E * F32


def test_recorder_counts_the_experts_a_real_forward_routed_to():
    D = E = 6
    moe = MoE(D, 3, E, topk=2).eval()
    with torch.no_grad():  # one-hot token i scores expert i highest and i+1 second
        moe.router.weight.copy_(10 * torch.eye(E) + 5 * torch.roll(torch.eye(E), 1, dims=0))
    x = torch.eye(E)[[0, 3, 0]].unsqueeze(1)  # tokens e0, e3, e0 -> experts {0, 1, 3, 4}
    with Recorder(moe) as rec, torch.no_grad():
        moe(x)
    assert sorted(rec.routes[id(moe)].unique().tolist()) == [0, 1, 3, 4]
    b = rec.step_bytes(moe)
    assert b["distinct_experts"] == 4
    assert b["total"] == 4 * 3 * D * 3 * F32 + D * E * F32
    assert moe.record_routing is False and not moe._forward_hooks  # restored


def _ultramem(**kw):
    torch.manual_seed(0)
    cfg = dict(dim=16, num_keys=4, key_dim=8, value_dim=8, heads=2, topk=4, value_expansion=4)
    return UltraMemLayer(UltraMemConfig(**{**cfg, **kw}))


def test_ultramem_duplicate_rows_are_read_once():
    layer = _ultramem()
    N = layer.cfg.num_values  # 16 physical rows, 64 virtual slots
    layer.perm.copy_(torch.arange(4 * N))  # identity: virtual v -> block v // N, row v % N
    idx = torch.tensor([[0, N, 5], [N + 5, 2 * N + 5, 2]])  # rows 0, 0, 5, 5, 5, 2
    b = memory_layer_bytes(layer, idx)
    values = layer.values.weight
    dense = _nbytes(p for p in layer.parameters() if p is not values)
    assert b["distinct_rows"] == 3
    assert b["value_rows"] == 3 * layer.cfg.v_dim * F32
    assert b["index"] == 6 * 8  # six distinct virtual slots, int64 perm entries
    assert b["dense_weights"] == dense
    assert b["total"] == dense + 3 * layer.cfg.v_dim * F32 + 48


def test_pkm_duplicate_rows_are_read_once():
    torch.manual_seed(0)
    layer = PKMLayer(PKMConfig(dim=16, num_keys=4, key_dim=8, heads=2, topk=3))
    b = memory_layer_bytes(layer, torch.tensor([[1, 1, 7], [7, 3, 1]]))
    assert b["distinct_rows"] == 3 and b["index"] == 0
    assert b["value_rows"] == 3 * 16 * F32  # PKM rows are full width (dim_out)
    dense = _nbytes(p for p in layer.parameters() if p is not layer.values.weight)
    assert b["total"] == dense + 3 * 16 * F32


@pytest.mark.parametrize("kind", ["ultramem", "pkm"])
def test_recorder_rows_match_the_layers_own_usage_mask(kind):
    torch.manual_seed(1)
    layer = _ultramem() if kind == "ultramem" else PKMLayer(PKMConfig(dim=16, num_keys=6, key_dim=8,
                                                                      heads=2, topk=3, query_norm="layer"))
    layer.eval()
    x = torch.randn(5, 1, 16)
    with Recorder(layer) as rec, torch.no_grad():
        layer(x)
    b = rec.step_bytes(layer)
    rows = int(used_rows(layer, x).sum())  # diagnostics' independent path
    assert b["distinct_rows"] == rows
    row_bytes = layer.values.weight.numel() // layer.values.num_rows * F32
    assert b["value_rows"] == rows * row_bytes
    assert "retrieve" not in vars(layer)  # the PKM instance patch is undone


def test_block_of_ffn_and_memory_sums_both():
    layer = _ultramem().eval()
    ffn = SwiGLU(16, 24)
    block = torch.nn.ModuleDict({"ffn": ffn, "mem": layer})
    x = torch.randn(3, 1, 16)
    with Recorder(block) as rec, torch.no_grad():
        ffn(x), layer(x)
    b = rec.step_bytes(block)
    alone = rec.step_bytes(layer)
    assert b["total"] == alone["total"] + _nbytes(ffn.parameters())


def test_model_step_bytes_counts_every_moe_layer():
    torch.manual_seed(0)
    model = LanguageModel(LMConfig(vocab_size=32, dim=16, n_layers=2, n_heads=2, ffn="moe", moe_experts=4,
                                   moe_topk=1, moe_hidden=8)).eval()
    with Recorder(model) as rec, torch.no_grad():
        model(torch.tensor([[1], [2], [3]]))
    b = rec.step_bytes(model)
    moes = model.moe_layers()
    experts = sum(rec.routes[id(m)].unique().numel() for m in moes)
    expert_params = {id(p) for m in moes for p in m.expert_parameters()}
    dense = _nbytes(p for p in model.parameters() if id(p) not in expert_params)
    assert b["distinct_experts"] == experts
    assert b["total"] == dense + experts * 3 * 16 * 8 * F32


def test_kv_cache_bytes_hand_count():
    assert kv_cache_bytes(n_layers=3, batch=5, positions=7, dim=16, element_size=2) == 2 * 3 * 5 * 7 * 16 * 2


def test_layer_param_counts_moe_and_memory():
    moe = MoE(8, 4, 6, topk=2)
    c = layer_param_counts(moe)
    assert c == {"total": 6 * 96 + 48, "sparse": 6 * 96, "activated": 2 * 96 + 48}
    assert moe_slot_counts(8, 4, 6, 2) == (c["total"], c["activated"])
    layer = _ultramem()
    c = layer_param_counts(layer)
    values = layer.values.weight.numel()
    assert c["sparse"] == values
    assert c["activated"] == c["total"] - values + 2 * 4 * 8  # heads * topk rows of width 8


@pytest.mark.parametrize("kind,fields", [
    ("ultramem", dict(key_dim=4, value_dim=8, heads=1, topk=4, value_expansion=1)),
    ("pkm", dict(key_dim=8, heads=2, topk=4, query_norm="layer")),
])
def test_fitted_counts_and_matching(kind, fields):
    counts = memory_counts(kind, 16, fields)
    n = 21  # away from the three fitting points
    if kind == "ultramem":
        real = layer_param_counts(UltraMemLayer(UltraMemConfig(dim=16, num_keys=n, **fields)))
    else:
        real = layer_param_counts(PKMLayer(PKMConfig(dim=16, num_keys=n, **fields)))
    assert counts(n) == (real["total"], real["activated"])
    T, A = moe_slot_counts(16, 64, 8, 2)
    n, w = match_memory(kind, 16, fields, T, A)
    tot, act = counts(n)
    step = counts(n + 1)[0] - tot  # params of one more key per side: the finest total we can hit
    assert abs(3 * 16 * w + tot - T) <= step
    assert abs(3 * 16 * w + act - A) <= 3 * 16  # w is rounded
    n2, w2 = match_memory(kind, 16, fields, 4 * T, A, ffn_hidden=w)
    assert w2 == w and n2 > n


def test_hf_moe_bytes_when_transformers_is_installed():
    pytest.importorskip("transformers")
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    block = MixtralSparseMoeBlock(MixtralConfig(hidden_size=8, intermediate_size=4, num_local_experts=6,
                                                num_experts_per_tok=2)).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_()
    with Recorder(block) as rec, torch.no_grad():
        block(torch.randn(4, 1, 8))
    distinct = rec.routes[id(block)].unique().numel()
    assert rec.step_bytes(block)["total"] == distinct * 3 * 8 * 4 * F32 + 6 * 8 * F32
    assert layer_param_counts(block)["activated"] == 2 * 96 + 48


@pytest.mark.parametrize("multiple", [1, 2, 3])
@pytest.mark.parametrize("target", [0, 5, 99, 100, 101, 12345])
def test_solve_increasing_picks_the_closest_allowed_n(target, multiple):
    f = lambda n: n * n  # noqa: E731
    n = solve_increasing(f, target, multiple)
    allowed = [k for k in range(2, 200) if k % multiple == 0]
    assert n % multiple == 0 and n >= 2
    assert abs(f(n) - target) == min(abs(f(k) - target) for k in allowed)
