"""Quantised value tables (int8 / int4 / fp8) against dequantise-then-reference, at table, layer
and model level; the training refusal; the safetensors round trip."""

import pytest
import torch

from ultramem import (
    PKMConfig,
    PKMLayer,
    QuantizedValueTable,
    UltraMemConfig,
    UltraMemLayer,
    ValueTable,
    load_quantized,
    quantize_values,
    save_quantized,
)
from ultramem.model import LanguageModel, LMConfig
from ultramem.ops import dispatch
from ultramem.ops.pooling import pool_reference
from ultramem.quantized import KINDS, dequantize_rows

# (T, K, G, C, D, N): PKM-like (one bag, one chunk), UltraMem with IVE bags and MCS chunks
SHAPES = [(1, 1, 1, 1, 2, 1), (5, 8, 1, 1, 16, 40), (3, 12, 4, 2, 8, 30), (7, 24, 4, 4, 4, 50),
          (2, 9, 9, 2, 6, 7), (64, 64, 4, 2, 32, 300)]


def make_table(C, D, N, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    table = ValueTable(N, C * D, C)
    with torch.no_grad():
        table.weight.copy_(torch.randn(N * C, D, generator=gen) * torch.rand(N * C, 1, generator=gen) * 3)
    return table, QuantizedValueTable.from_table(table, kind).eval()


def make_lookup(T, K, G, C, N, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    row = torch.randint(0, N, (T, K), generator=gen)
    bag = torch.randint(0, G, (T, K), generator=gen) if G > 1 else None
    return row, bag, torch.randn(T, K, C, generator=gen)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantized_pool_matches_dequantized_reference(kind, shape):
    T, K, G, C, D, N = shape
    _, q = make_table(C, D, N, kind, seed=sum(shape))
    row, bag, w = make_lookup(T, K, G, C, N, seed=sum(shape))
    want = pool_reference(q.dequantize().double(), row, bag, w.double(), G).reshape(T, G, C * D)
    with torch.no_grad():
        fast = q.pool(row, bag, w, G)
        ref_path = q.pool(row, bag, w, G, impl="reference")
        with dispatch.force_reference():
            forced = q.pool(row, bag, w, G)
    for got in (fast, ref_path, forced):
        assert got.shape == (T, G, C * D) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_plain_torch_dequantization_matches_the_unpack_operator(kind):
    """The gathered path (GPU, reference) reads the prepacked format itself: it must agree."""
    _, q = make_table(2, 10, 33, kind, seed=3)
    mine = dequantize_rows(q.packed, kind, q.chunk_dim)
    torch.testing.assert_close(mine, q.dequantize(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind, levels", [("int8", 255), ("int4", 15)])
def test_rowwise_error_is_within_half_a_step_of_each_row(kind, levels):
    table, q = make_table(4, 8, 200, kind, seed=5)
    w = table.weight.detach()
    step = (w.amax(1) - w.amin(1)) / levels
    err = (q.dequantize() - w).abs().amax(1)
    assert (err <= 0.5 * step * 1.01 + 1e-3 * step.max()).all()  # fp16 scales in int4: the 1e-3 slack
    assert err.max() > 0  # it did quantise


def test_fp8_relative_error_is_a_few_percent():
    table, q = make_table(2, 16, 100, "fp8", seed=6)
    w = table.weight.detach()
    rel = (q.dequantize() - w).abs().amax(1) / w.abs().amax(1)
    assert rel.max() < 0.07 and rel.max() > 0


def um_layer(**kw):
    base = dict(dim=24, num_keys=6, key_dim=8, value_dim=16, heads=2, topk=6, tucker_rank=2,
                num_cores=2, value_expansion=4)
    return UltraMemLayer(UltraMemConfig(**{**base, **kw}))


def pkm_layer():
    return PKMLayer(PKMConfig(dim=24, num_keys=8, key_dim=8, heads=2, topk=4, value_dim=16))


def _dequantized_copy(layer):
    """The same layer with its quantised table replaced by the fp32 table it represents."""
    q = layer.values
    ref = ValueTable(q.num_rows, q.dim, q.num_chunks)
    with torch.no_grad():
        ref.weight.copy_(q.dequantize())
    return ref


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("make", [um_layer, lambda: um_layer(num_cores=1, value_expansion=1), pkm_layer])
def test_layer_output_equals_the_dequantized_tables_output(kind, make):
    torch.manual_seed(0)
    layer = make().eval()
    x = torch.randn(3, 5, 24)
    quantize_values(layer, kind)
    with torch.no_grad():
        got = layer(x)
        layer.values = _dequantized_copy(layer)
        want = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def tiny_lm(ffn="ultramem"):
    mem = ({"num_keys": 8, "key_dim": 8, "value_dim": 32, "heads": 2, "topk": 8} if ffn == "ultramem"
           else {"num_keys": 8, "key_dim": 8, "heads": 2, "topk": 4})
    return LanguageModel(LMConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, max_seq_len=16, ffn=ffn,
                                  memory_placement="0:1", memory=mem))


@pytest.mark.parametrize("ffn", ["ultramem", "pkm"])
def test_model_level_quantization_stays_close_to_fp32(ffn):
    torch.manual_seed(1)
    model = tiny_lm(ffn).eval()
    for layer in [m for m in model.modules() if hasattr(m, "values")]:
        layer.values.init_weights(0.5)  # memory output large enough to matter in the logits
    idx = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        ref = model(idx)[0]
        errs = {}
        for kind in KINDS:
            m = tiny_lm(ffn).eval()
            m.load_state_dict(model.state_dict())
            quantize_values(m, kind)
            errs[kind] = ((m(idx)[0] - ref).norm() / ref.norm()).item()
    # relative logit error; measured ~0.003 / 0.02 / 0.06 (ultramem), bounds 3x that
    assert 0 < errs["int8"] < 1e-2 and errs["fp8"] < 6e-2 and errs["int4"] < 0.2
    assert errs["int8"] < errs["fp8"] < errs["int4"]


def test_training_a_quantized_table_is_refused():
    layer = um_layer()
    quantize_values(layer, "int8")
    assert list(layer.values.parameters()) == [] and layer.value_parameters() == []
    layer.train()
    with pytest.raises(RuntimeError, match="quantised tables are inference-only"):
        layer(torch.randn(1, 2, 24))
    with torch.no_grad():  # training mode without autograd (e.g. a probe) still reads
        assert layer(torch.randn(1, 2, 24)).shape == (1, 2, 24)
    with pytest.raises(RuntimeError, match="inference-only"):
        layer.init_weights()


def test_bad_arguments_are_refused():
    layer = um_layer()
    with pytest.raises(ValueError, match="dtype: must be one of"):
        quantize_values(layer, "int2")
    quantize_values(layer, "int8")
    with pytest.raises(ValueError, match="expected a full-precision table"):
        quantize_values(layer, "int4")
    with pytest.raises(ValueError, match="int4 needs an even chunk width"):
        QuantizedValueTable(4, 6, 2, "int4")
    with pytest.raises(ValueError, match="no memory layer"):
        quantize_values(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("kind", ["int4", "fp8"])
def test_save_load_round_trip_is_exact(kind, tmp_path):
    torch.manual_seed(2)
    model = quantize_values(tiny_lm().eval(), kind)
    path = save_quantized(model, tmp_path / "q.safetensors")
    loaded = load_quantized(path)
    assert isinstance(loaded.memory[0].values, QuantizedValueTable) and loaded.memory[0].values.kind == kind
    idx = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], loaded(idx)[0])
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="q.safetensors"):
        load_quantized(path)  # a truncated file is refused, naming it
