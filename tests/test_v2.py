"""UltraMemV2: config errors, pre-value pooling vs its oracle (forward and backward), exact search
vs a brute force written here, shared pools, init statistics, decode equivalence."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ultramem import ValueTable
from ultramem.ffn import SwiGLU
from ultramem.v2 import (
    UltraMemV2Config,
    UltraMemV2Layer,
    build_layers,
    gather_rows,
    peer_reference,
    solve_value_std,
)


def small_cfg(**kw):
    base = dict(dim=24, num_keys=5, key_dim=8, value_dim=12, pre_value_dim=4, topk=6, depth=2)
    base.update(kw)
    return UltraMemV2Config(**base)


@pytest.mark.parametrize("field, kw", [
    ("dim", dict(dim=0)),
    ("value_expansion", dict(value_expansion=3)),
    ("value_dim", dict(value_dim=7)),
    ("topk", dict(topk=200)),
    ("stage1_topk", dict(stage1_topk=11)),
    ("share_ratio", dict(share_ratio=1.5)),
    ("share_group", dict(share_group=0)),
    ("pre_value_act", dict(pre_value_act="relu")),
    ("init", dict(init="authors")),
    ("norm", dict(norm="batch")),
    ("query_per_rank", dict(query_per_rank="yes")),
    ("value_init_std", dict(value_init_std=-1.0)),
    ("ffn_init_std", dict(ffn_init_std=0)),
    ("pre_value_dim", dict(pre_value_dim=0)),
])
def test_bad_config_names_field(field, kw):
    with pytest.raises(ValueError, match=rf"^{field}: .*\(got "):
        small_cfg(**kw)


def test_build_layers_checks_depth_with_windows():
    with pytest.raises(ValueError, match=r"^depth: "):
        build_layers(small_cfg(share_ratio=0.5, depth=2), 3)


@pytest.mark.parametrize("sparse", [False, True])
def test_value_table_gather_matches_rows(sparse):
    torch.manual_seed(0)
    table = ValueTable(7, 6, num_chunks=2, sparse=sparse)
    table.init_weights(1.0)
    row = torch.randint(0, 7, (4, 5))
    got = table.gather(row)
    assert torch.equal(got, table.rows()[row])
    (got * torch.arange(6.0)).sum().backward()
    grad = table.weight.grad.to_dense() if sparse else table.weight.grad
    ref = torch.zeros(7, 6).index_add_(0, row.reshape(-1), torch.arange(6.0).expand(20, 6))
    torch.testing.assert_close(grad.view(7, 6), ref)
    # tables without `gather` serve rows through their `pool` (one bag per kept entry)
    torch.testing.assert_close(gather_rows(_PoolOnly(table), row), table.rows()[row])


class _PoolOnly(torch.nn.Module):
    def __init__(self, table):
        super().__init__()
        self.table, self.num_chunks = table, table.num_chunks

    def pool(self, *args):
        return self.table.pool(*args)


def _oracle_output(layer, x):
    """The layer's output from its own retrieval but pooled by `peer_reference` on plain rows."""
    cfg = layer.cfg
    B, T, _ = x.shape
    idx, s = layer.retrieval(x)
    row, bag = layer.slot_locations(idx.reshape(B * T, -1))
    z = layer.w_pre(x).reshape(B * T, -1)
    pooled = peer_reference(layer.values.rows(), layer.pre_values.rows(), row, bag,
                            s.reshape(B * T, -1, cfg.num_cores), z, cfg.value_expansion, cfg.pre_value_act)
    return layer.w_o(pooled.reshape(B, T, -1))


@pytest.mark.parametrize("kw", [dict(), dict(value_expansion=4), dict(pre_value_act="gelu", num_cores=1),
                                dict(query_per_rank=False, value_expansion=4, pre_value_act="gelu"),
                                dict(share_ratio=0.6)])
@pytest.mark.parametrize("lookup", ["fused", "reference"])
def test_pooling_with_pre_values_matches_oracle(kw, lookup):
    torch.manual_seed(1)
    layer = UltraMemV2Layer(small_cfg(lookup=lookup, value_init_std=0.5, **kw))
    twin = copy.deepcopy(layer)
    twin.after_optimizer_step()  # a copy has fresh version counters: re-stamp its Tucker refresh
    x = torch.randn(2, 7, 24)
    out, ref = layer(x), _oracle_output(twin, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    for (name, p), q in zip(layer.named_parameters(), twin.parameters(), strict=True):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def _brute_force_topk(layer, x):
    """Top-m virtual slots by explicit per-rank queries, normed keys and the summed cores."""
    cfg, ret = layer.retrieval.cfg, layer.retrieval
    B, T, _ = x.shape
    R, Dk = cfg.tucker_rank, cfg.key_dim
    q = F.layer_norm(ret.w_q(x).view(B, T, 2, R, Dk), (Dk,), eps=1e-6)
    q_row, q_col = q[:, :, 0] * ret.q_row_norm, q[:, :, 1] * ret.q_col_norm  # (B, T, R, Dk)
    k_row = F.layer_norm(ret.keys_row, (Dk,), eps=1e-6) * ret.k_row_norm  # (H, P, R, Dk)
    k_col = F.layer_norm(ret.keys_col, (Dk,), eps=1e-6) * ret.k_col_norm
    s_row = torch.einsum("btrk,hprk->bthrp", q_row, k_row)
    s_col = torch.einsum("btrk,hprk->bthrp", q_col, k_col)
    grid = torch.einsum("bthrp,hrs,bthsq->bthpq", s_row, ret.cores.sum(1), s_col)
    return grid.flatten(-2).topk(cfg.topk, dim=-1).indices


@pytest.mark.parametrize("kw", [dict(), dict(tucker_rank=3, num_cores=3, value_dim=12), dict(heads=2)])
def test_exact_search_matches_brute_force_and_full_stage1(kw):
    torch.manual_seed(2)
    layer = UltraMemV2Layer(small_cfg(**kw))
    with torch.no_grad():
        layer.retrieval.cores.normal_()  # signed cores: the rank-1 proxy is no longer exact
        layer.retrieval.refresh_tucker(force=True)
    x = torch.randn(2, 9, 24)
    oracle = _brute_force_topk(layer, x).sort(-1).values
    exact = layer.retrieve(x, exact=True).indices.sort(-1).values
    assert torch.equal(exact, oracle)
    # stage 1 keeping every row and column makes the two-stage search exact
    full = UltraMemV2Layer(layer.cfg.replace(stage1_topk=layer.cfg.keys_per_side))
    full.load_state_dict(layer.state_dict())
    assert torch.equal(full.retrieve(x).indices.sort(-1).values, oracle)
    # the default stage 1 keeps at least part of the exact top-m
    hits = (layer.retrieve(x).indices.unsqueeze(-1) == oracle.unsqueeze(-2)).any(-1).float().mean()
    assert hits > 0.3


def test_shared_pool_gets_summed_gradient():
    torch.manual_seed(3)
    cfg = small_cfg(share_group=3, value_init_std=0.5)
    layers = build_layers(cfg, 4)
    assert layers[1].values is layers[0].values and layers[2].pre_values is layers[0].pre_values
    assert layers[3].values is not layers[0].values  # the next group has its own pool
    separate = [copy.deepcopy(m) for m in layers[:3]]  # each copy owns a private table
    for m in separate:
        m.after_optimizer_step()
    assert separate[1].values is not separate[0].values
    xs = [torch.randn(2, 5, 24) for _ in range(3)]
    sum(m(x).square().sum() for m, x in zip(layers[:3], xs, strict=True)).backward()
    sum(m(x).square().sum() for m, x in zip(separate, xs, strict=True)).backward()
    for name in ("values", "pre_values"):
        summed = sum(getattr(m, name).weight.grad for m in separate)
        torch.testing.assert_close(getattr(layers[0], name).weight.grad, summed, rtol=1e-5, atol=1e-7)


def test_share_ratio_windows_read_their_rows():
    cfg = small_cfg(share_ratio=0.5, depth=4)
    assert cfg.table_rows == 4 * 25 and cfg.window_keys == math.isqrt(50)
    layers = build_layers(cfg, 4)
    assert all(m.values is layers[0].values for m in layers)
    every = torch.arange(cfg.num_virtual)
    for i, m in enumerate(layers):
        rows = m.physical_rows(every)
        want = (torch.arange(cfg.window_rows) + i * 25) % cfg.table_rows
        assert torch.equal(rows.unique(), want.unique())


def _ffn_variance_ratio(seed, **kw):
    torch.manual_seed(seed)
    D, L, hidden = 64, 4, 170
    layer = UltraMemV2Layer(UltraMemV2Config(dim=D, num_keys=16, key_dim=32, topk=16, depth=L,
                                             ffn_hidden=hidden, **kw))
    ffn = SwiGLU(D, hidden)  # LanguageModel.init_weights' init
    torch.nn.init.normal_(ffn.w_in.weight, std=0.02)
    torch.nn.init.normal_(ffn.w_down.weight, std=0.02 / math.sqrt(2 * L))
    x = torch.randn(4, 1024, D)
    with torch.no_grad():
        return layer(x).var().item() / ffn(x).var().item()


@pytest.mark.parametrize("kw", [dict(), dict(value_expansion=4, pre_value_act="gelu")])
def test_init_output_variance_matches_ffn_branch(kw, caplog):
    with caplog.at_level("INFO", logger="ultramem.v2"):
        ratios = [_ffn_variance_ratio(seed, **kw) for seed in range(3)]
    assert "sigma_s" in caplog.text and "sigma_V" in caplog.text
    assert 0.8 < sum(ratios) / len(ratios) < 1.2, ratios


def test_solve_value_std_inverts_the_balance():
    std = solve_value_std(1e-3, kept=32, bags=4, mean_sq_score=2.0, p_dim=8)
    assert math.isclose(32 / 4 * 2.0 * 8 * std ** 4, 1e-3, rel_tol=1e-9)
    g = solve_value_std(1e-3, kept=32, bags=4, mean_sq_score=2.0, p_dim=8, act="gelu")
    a = torch.randn(2_000_000, dtype=torch.float64) * math.sqrt(8) * g
    assert math.isclose(32 / 4 * 2.0 * F.gelu(a).square().mean().item() * g * g, 1e-3, rel_tol=0.02)


def test_step_by_step_equals_full_forward():
    torch.manual_seed(4)
    layer = UltraMemV2Layer(small_cfg()).eval()
    x = torch.randn(2, 6, 24)
    state = layer.new_state()
    assert state is None
    steps = torch.cat([layer(x[:, t:t + 1], state) for t in range(6)], dim=1)
    torch.testing.assert_close(steps, layer(x), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ the LM


def _lm(**kw):
    from ultramem.model import LanguageModel, LMConfig

    base = dict(vocab_size=64, dim=24, n_layers=4, n_heads=2, max_seq_len=32, ffn="ultramem_v2",
                memory=dict(num_keys=5, key_dim=8, value_dim=12, pre_value_dim=4, topk=6, share_group=2))
    base.update(kw)
    torch.manual_seed(5)
    return LanguageModel(LMConfig(**base))


def test_lm_places_a_memory_beside_every_ffn_and_shares_pools():
    model = _lm()
    assert model.cfg.memory_placement == "0:0/1:1/2:2/3:3" and len(model.memory) == 4
    mem = model.memory
    assert mem[1].values is mem[0].values and mem[2].values is not mem[0].values
    assert mem[0].cfg.depth == 4 and mem[0].cfg.ffn_hidden == model.cfg.ffn_hidden
    vals = model.value_parameters()
    assert len(vals) == len({id(p) for p in vals}) == 4  # 2 pools x (values, pre-values), once each


def test_lm_counts_shared_pools_once():
    from ultramem.counting import count_params

    model = _lm()
    counts = count_params(model)
    unique = {id(p): p for p in model.parameters()}
    assert counts["total"] == sum(p.numel() for p in unique.values())
    cfg = model.memory[0].cfg
    assert counts["memory_values"] == 2 * cfg.table_rows * (cfg.v_dim + cfg.p_dim)
    # activated: every layer reads its K rows of both tables, shared or not
    dense = sum(p.numel() for p in unique.values()) - counts["sparse"] - counts["embedding"]
    assert counts["activated"] == dense + 4 * cfg.topk * (cfg.v_dim + cfg.p_dim)


def test_lm_decode_with_kv_cache_equals_full_forward():
    model = _lm().eval()
    idx = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_kv_cache(2)
        first, _ = model(idx[:, :4], kv_cache=cache)
        rest = [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(4, 10)]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, rtol=1e-5, atol=1e-5)


def test_lm_config_v2_fields():
    from ultramem.model import LMConfig

    mem = dict(num_keys=5, key_dim=8, value_dim=12, pre_value_dim=4, topk=6)
    cfg = LMConfig(dim=24, n_heads=2, ffn="ultramem_v2", memory=mem, memory_compute_ratio=0.3)
    from ultramem.v2 import memory_flops_per_token

    mem_flops = memory_flops_per_token(cfg.memory_config())
    ratio = mem_flops / (mem_flops + 6 * 24 * cfg.ffn_hidden)
    assert abs(ratio - 0.3) < 0.01
    assert LMConfig.from_dict(cfg.to_dict()) == cfg
    for field, kw in [("memory_placement", dict(memory_placement="0:1")),
                      ("memory_compute_ratio", dict(memory_compute_ratio=1.5)),
                      ("ffn_hidden", dict(memory_compute_ratio=0.3, ffn_hidden=8))]:
        with pytest.raises(ValueError, match=rf"^{field}: "):
            LMConfig(dim=24, n_heads=2, ffn="ultramem_v2", memory=mem, **kw)
    with pytest.raises(ValueError, match=r"^memory_compute_ratio: "):
        LMConfig(dim=24, n_heads=2, ffn="dense", memory_compute_ratio=0.3)


def test_lm_diagnostics_per_layer():
    from ultramem.diagnostics import MemoryProbe

    model = _lm().eval()
    with MemoryProbe(model, recall_tokens=8) as probe, torch.no_grad():
        model(torch.randint(0, 64, (2, 12)))
    stats = probe.stats()
    assert {f"mem{i}_recall" for i in range(4)} <= set(stats)
    assert all(0 < stats[f"mem{i}_rows_used"] <= 1 for i in range(4))


def test_tiny_preset_is_matched():
    from ultramem.counting import count_params
    from ultramem.model import LanguageModel, LMConfig
    from ultramem.presets import MODELS, get_preset

    counts = {k: count_params(LanguageModel(LMConfig.from_dict({**MODELS[k], "vocab_size": 512})))
              for k in ("dense", "moe", "ultramem-v2")}
    v2 = counts["ultramem-v2"]
    assert abs(v2["activated"] / counts["dense"]["activated"] - 1) < 0.01
    assert abs(v2["total"] / counts["moe"]["total"] - 1) < 0.01
    assert get_preset("tiny-ultramem-v2")["model"]["ffn"] == "ultramem_v2"


def test_lm_checkpoint_round_trip_keeps_pools_shared(tmp_path):
    from ultramem.checkpoint import load_checkpoint, save_checkpoint

    model, other = _lm(), _lm()
    with torch.no_grad():
        model.memory[0].values.weight.add_(1.0)  # differs from `other`, visible through the sharer
    save_checkpoint(tmp_path / "m.safetensors", model, step=3)
    load_checkpoint(tmp_path / "m.safetensors", other)
    assert other.memory[1].values is other.memory[0].values
    torch.testing.assert_close(other.memory[1].values.weight, model.memory[0].values.weight)
    idx = torch.randint(0, 64, (1, 8))
    torch.testing.assert_close(other(idx)[0], model(idx)[0])


def test_sparse_value_gradients_match_dense():
    torch.manual_seed(6)
    dense = UltraMemV2Layer(small_cfg(value_init_std=0.5))
    sparse = UltraMemV2Layer(small_cfg(value_init_std=0.5, sparse_values=True))
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(2, 5, 24)
    dense(x).square().sum().backward()
    sparse(x).square().sum().backward()
    for name in ("values", "pre_values"):
        g = getattr(sparse, name).weight.grad
        assert g.is_sparse
        torch.testing.assert_close(g.to_dense(), getattr(dense, name).weight.grad, rtol=1e-5, atol=1e-7)


def test_empty_half_precision_and_copies_after_inference():
    import io

    torch.manual_seed(7)
    layer = UltraMemV2Layer(small_cfg())
    for shape in ((0, 3), (2, 0)):
        x = torch.randn(*shape, 24)
        assert layer(x).shape == (*shape, 24) and layer.retrieve(x).scores.shape == (*shape, 1, 6, 2)
    x = torch.randn(1, 4, 24)
    y = layer(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), rtol=0.05, atol=0.05 * layer(x).abs().max().item())
    with torch.inference_mode():
        layer(x)
    with torch.no_grad():
        want = layer(x)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    for other in (copy.deepcopy(layer), torch.load(buf, weights_only=False)):  # our own bytes
        with torch.no_grad():
            assert torch.equal(other(x), want)


def test_search_override_reaches_v2_layers():
    from ultramem.diagnostics import retrieval_recall, search_override

    model = _lm().eval()
    x = torch.randn(1, 6, 24)
    with search_override(model, topm_search="exact") as layers:
        assert len(layers) == 4 and all(m.cfg.topm_search == "exact" for m in layers)
        assert retrieval_recall(layers[0], x) == 1.0
    assert all(m.cfg.topm_search == "rank1" for m in model.memory)


def test_experiment_suite_size_is_matched():
    from ultramem.experiments.matching import counts_for
    from ultramem.experiments.suites import MATCHED, SEQ, ULTRAMEM_V2, VOCAB

    v2 = counts_for(ULTRAMEM_V2, VOCAB, SEQ)
    assert abs(v2["activated"] / counts_for(MATCHED["dense"], VOCAB, SEQ)["activated"] - 1) < 0.01
    assert abs(v2["total"] / counts_for(MATCHED["moe"], VOCAB, SEQ)["total"] - 1) < 0.01


def test_cli_trains_checkpoints_and_resumes_a_v2_model(tmp_path):
    from ultramem.checkpoint import read_checkpoint_meta
    from ultramem.cli import main

    tiny = ["--set", "model.dim=32", "--set", "model.n_heads=2", "--set", "data.num_people=12",
            "--set", "data.vocab_size=300", "--set", "data.fact_repetitions=2",
            "--set", "train.warmup_steps=1", "--set", "train.batch_size=2", "--set", "train.seq_len=16",
            "--set", "train.fact_queries=3",
            "--set", "train.eval_windows=2", "--set", "train.threads=1", "--no-progress",
            "--set", f"train.cache_dir={tmp_path / 'cache'}"]
    run = tmp_path / "run"
    # read tallies of the shared pool go into the checkpoint once (safetensors refuses aliases)
    assert main(["train", "--preset", "tiny-ultramem-v2", "--out", str(run), "--set", "train.steps=2",
                 *tiny]) == 0
    assert main(["train", "--preset", "tiny-ultramem-v2", "--out", str(run), "--resume",
                 "--set", "train.steps=3", *tiny]) == 0
    assert read_checkpoint_meta(run / "checkpoint.safetensors")["step"] == 3


@pytest.mark.parametrize("query_per_rank", [True, False])
def test_no_grad_decode_matches_the_grad_path(query_per_rank):
    torch.manual_seed(8)
    layer = UltraMemV2Layer(small_cfg(query_per_rank=query_per_rank)).eval()
    x = torch.randn(1, 3, 24)  # <= 8 tokens: v1's search-only path where it applies
    want = layer(x)
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
