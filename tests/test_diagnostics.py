"""Retrieval recall and value-row usage probes."""

import pytest
import torch

from ultramem import UltraMemConfig, UltraMemLayer, retrieval_recall, used_rows
from ultramem.diagnostics import MemoryProbe, mean_pairwise_cosine, memory_output_grads, row_reads
from ultramem.model import LanguageModel, LMConfig


def test_used_rows_marks_exactly_the_physical_rows_read():
    torch.manual_seed(0)
    layer = UltraMemLayer(UltraMemConfig(dim=16, num_keys=4, key_dim=8, value_dim=8, topk=3))
    x = torch.randn(1, 2, 16)
    idx = layer.retrieve(x).indices.reshape(-1)
    expected = torch.zeros(16, dtype=torch.bool)
    expected[layer.perm[idx] % 16] = True
    assert torch.equal(used_rows(layer, x), expected)
    counts = torch.zeros(16, dtype=torch.long)
    for slot in idx.tolist():  # naive tally: every (token, head, kept slot) reads one physical row
        counts[layer.perm[slot].item() % 16] += 1
    assert torch.equal(row_reads(layer, x), counts) and counts.sum() == 2 * layer.cfg.heads * 3


def test_recall_drops_when_stage_one_filters_hard():
    torch.manual_seed(1)
    cfg = UltraMemConfig(dim=16, num_keys=8, key_dim=8, value_dim=8, topk=16, stage1_topk=4,
                         tucker_rank=3)
    layer = UltraMemLayer(cfg)
    x = torch.randn(2, 8, 16)
    r = retrieval_recall(layer, x)
    assert 0 < r < 1  # a 4x4 candidate grid cannot always hold the true top-16 of 16x16
    assert retrieval_recall(UltraMemLayer(cfg.replace(stage1_topk=16)), x) == 1.0


def test_memory_probe_on_a_model():
    torch.manual_seed(2)
    cfg = LMConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, max_seq_len=8, ffn="ultramem",
                   memory_placement="0:1", memory={"num_keys": 4, "key_dim": 8, "value_dim": 8, "topk": 2})
    model = LanguageModel(cfg).eval()
    with torch.no_grad(), MemoryProbe(model, recall_tokens=4) as probe:
        model(torch.randint(0, 50, (2, 8)))
    stats = probe.stats()
    assert set(stats) == {"mem0_rows_used", "mem0_recall"}
    assert 0 < stats["mem0_rows_used"] <= 1 and 0 <= stats["mem0_recall"] <= 1
    assert not model.memory_layers()[0]._forward_pre_hooks  # hooks removed on exit


def test_search_override_switches_and_restores_every_layer():
    from ultramem.diagnostics import search_override

    model = LanguageModel(LMConfig(vocab_size=32, dim=32, n_layers=2, n_heads=2, ffn="ultramem",
                                   memory_placement="0:0/1:1",
                                   memory={"num_keys": 4, "key_dim": 8, "value_dim": 16, "heads": 1,
                                           "topk": 2}))
    layers = list(model.memory_layers())
    before = [layer.cfg for layer in layers]
    with search_override(model, topm_search="exact") as got:
        assert len(got) == 2
        assert all(layer.cfg.topm_search == layer.retrieval.cfg.topm_search == "exact" for layer in layers)
    assert [layer.cfg for layer in layers] == before
    assert all(layer.retrieval.cfg is layer.cfg for layer in layers)
    with pytest.raises(ValueError, match="stage1_topk"), search_override(model, stage1_topk=99):
        pass
    assert [layer.cfg for layer in layers] == before


@pytest.mark.parametrize("n, d", [(2, 3), (7, 5), (40, 16)])
def test_mean_pairwise_cosine_matches_the_double_loop(n, d):
    g = torch.Generator().manual_seed(n * d)
    shared = torch.randn(d, generator=g, dtype=torch.float64)  # a common component: cosines > 0
    x = torch.randn(n + 1, d, generator=g, dtype=torch.float64) + shared
    x[0] = 0  # zero rows are dropped
    rows = [r for r in x if r.norm() > 0]
    pairs = [torch.nn.functional.cosine_similarity(a, b, dim=0).item()
             for i, a in enumerate(rows) for j, b in enumerate(rows) if i != j]
    assert mean_pairwise_cosine(x) == pytest.approx(sum(pairs) / len(pairs), abs=1e-9)
    same_direction = torch.ones(n + 1, d) * torch.arange(1.0, n + 2)[:, None]
    assert mean_pairwise_cosine(same_direction) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 2 non-zero rows"):
        mean_pairwise_cosine(torch.zeros(3, d))


def test_memory_output_grads_are_the_gradients_of_the_layer_outputs():
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=50, dim=32, n_layers=2, n_heads=2, max_seq_len=8, ffn="ultramem",
                   memory_placement="0:0/1:1",
                   memory={"num_keys": 4, "key_dim": 8, "value_dim": 8, "topk": 2})
    model = LanguageModel(cfg)
    x, y = torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8))
    grads = memory_output_grads(model, x, y)
    assert [g.shape for g in grads] == [(16, 32), (16, 32)]
    assert all(p.grad is None for p in model.parameters())
    # reference: add a zero perturbation to each layer's output and differentiate the loss by it
    for i, layer in enumerate(model.memory_layers()):
        eps = torch.zeros(2, 8, 32, requires_grad=True)
        h = layer.register_forward_hook(lambda _m, _a, out, eps=eps: out + eps)
        _, loss = model(x, y)
        h.remove()
        (ref,) = torch.autograd.grad(loss, eps)
        torch.testing.assert_close(grads[i], ref.reshape(16, 32))
