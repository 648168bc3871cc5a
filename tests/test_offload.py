"""Offloaded value tables (memory-mapped file / host memory, direct and staged lookups) return
exactly the in-memory outputs; bad files are refused naming them; training is refused."""

import pytest
import torch
from safetensors import safe_open
from test_quantized import SHAPES, make_lookup, pkm_layer, tiny_lm, um_layer

from ultramem import OffloadedValueTable, ValueTable, offload_values
from ultramem.offload import MapBudget, read_table_header, save_table, write_table_file

MODES = [dict(where="disk"), dict(where="disk", staged=True), dict(where="host"),
         dict(where="host", staged=True)]


def _table(C, D, N, dtype, seed):
    table = ValueTable(N, C * D, C).to(dtype)
    torch.manual_seed(seed)
    table.init_weights(1.0)
    return table


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_offloaded_pool_is_exactly_the_in_memory_pool(shape, dtype, tmp_path):
    T, K, G, C, D, N = shape
    table = _table(C, D, N, dtype, seed=sum(shape))
    path = save_table(table, tmp_path / "t.safetensors", block_rows=7)  # several blocks
    row, bag, w = make_lookup(T, K, G, C, N, seed=sum(shape))
    with torch.no_grad():
        want = table.pool(row, bag, w.to(dtype), G)
        for mode in MODES:
            got = OffloadedValueTable(path, N, C * D, C, dtype=dtype, **mode).eval().pool(row, bag, w, G)
            assert got.dtype == dtype and torch.equal(got, want), mode


@pytest.mark.parametrize("ffn", ["ultramem", "pkm"])
def test_offloaded_model_gives_exactly_the_in_memory_logits(ffn, tmp_path):
    torch.manual_seed(3)
    model = tiny_lm(ffn).eval()
    idx = torch.randint(0, 64, (3, 10))
    with torch.no_grad():
        want = model(idx)[0]
        files = offload_values(model, tmp_path / "tables")
        assert [f.name for f in files] == ["memory.0.values.safetensors"]
        assert isinstance(model.memory[0].values, OffloadedValueTable)
        assert torch.equal(model(idx)[0], want)
        model.memory[0].values.staged = True  # the CUDA path's host gather, run on CPU
        assert torch.equal(model(idx)[0], want)
        model.memory[0].values.release()  # unmapping the touched pages changes nothing
        v = model.memory[0].values  # ... nor does unmapping after every lookup
        model.memory[0].values = OffloadedValueTable(v.path, v.num_rows, v.dim, v.num_chunks,
                                                     map_budget_mb=1e-6)
        assert torch.equal(model(idx)[0], want) and model.memory[0].values._budget.estimate == 0


def test_map_budget_learns_when_the_kernel_maps_more_than_a_page_per_row():
    rss = [0]
    budget = MapBudget(64 << 20, 4096, rss_fn=lambda: rss[0])
    assert not budget.add(100)  # 400 KB estimated, below the first checkpoint (1 MB)
    rss[0] = 200 * (2 << 20)  # the kernel mapped a 2 MB folio for each of 200 rows
    assert budget.add(156)  # the checkpoint reads 400 MB mapped: over budget, release now
    assert budget.row_bytes >= 400 * 4096  # and later lookups are charged what a row really maps
    rss[0] = 0
    budget.reset()
    assert budget.add(50)  # 50 rows x ~1.6 MB: over the 64 MB budget at once
    plain = MapBudget(64 << 20, 4096, rss_fn=lambda: 0)
    assert not any(plain.add(1000) for _ in range(16)) and plain.add(1000)  # 64 MB at 16,384 rows


def test_layer_built_from_a_file_by_the_factory(tmp_path):
    torch.manual_seed(4)
    layer = um_layer().eval()
    x = torch.randn(2, 3, 24)
    with torch.no_grad():
        want = layer(x)
        path = save_table(layer.values, tmp_path / "v.safetensors")
        served = type(layer)(layer.cfg, table_factory=OffloadedValueTable.factory(path)).eval()
        # the rest of the layer (keys, cores, perm, W_o) from the original; the table from the file
        served.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("values.")})
        assert torch.equal(served(x), want)


def test_streamed_file_is_standard_safetensors(tmp_path):
    w = torch.randn(100, 6)
    path = write_table_file(tmp_path / "s.safetensors", (100, 6), torch.float32,
                            (w[i:i + 33] for i in range(0, 100, 33)), {"note": "x"})
    with safe_open(str(path), framework="pt") as f:
        assert torch.equal(f.get_tensor("weight"), w) and f.metadata()["note"] == "x"
    dtype, shape, start, meta = read_table_header(path)
    assert (dtype, shape, meta["note"]) == (torch.float32, (100, 6), "x") and start % 4096 == 0
    with pytest.raises(ValueError, match="chunks: gave"):
        write_table_file(tmp_path / "short.safetensors", (100, 6), torch.float32, [w[:50]])
    assert not (tmp_path / "short.safetensors").exists() and not list(tmp_path.glob(".*tmp"))


def test_bad_files_are_refused_naming_them(tmp_path):
    table = _table(2, 4, 20, torch.float32, seed=0)
    path = save_table(table, tmp_path / "good.safetensors")
    data = path.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[:-10])
    with pytest.raises(ValueError, match=r"trunc\.safetensors: truncated"):
        OffloadedValueTable(trunc, 20, 8, 2)
    with pytest.raises(ValueError, match=r"good\.safetensors: table shape \[40, 4\] does not fit"):
        OffloadedValueTable(path, 21, 8, 2)
    with pytest.raises(ValueError, match=r"good\.safetensors: table shape"):
        OffloadedValueTable(path, 20, 8, 1)
    with pytest.raises(ValueError, match=r"good\.safetensors: table dtype torch.float32, expected"):
        OffloadedValueTable(path, 20, 8, 2, dtype=torch.bfloat16)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=r"junk\.safetensors: not a value-table"):
        OffloadedValueTable(junk, 20, 8, 2)
    with pytest.raises(ValueError, match=r"missing\.safetensors"):
        OffloadedValueTable(tmp_path / "missing.safetensors", 20, 8, 2)
    with pytest.raises(ValueError, match="where: must be one of"):
        OffloadedValueTable(path, 20, 8, 2, where="gpu")


def test_training_an_offloaded_table_is_refused(tmp_path):
    layer = pkm_layer()
    offload_values(layer, tmp_path)
    assert layer.value_parameters() == []
    layer.train()
    with pytest.raises(RuntimeError, match="offloaded tables are inference-only"):
        layer(torch.randn(1, 2, 24))
    with pytest.raises(ValueError, match="expected an in-memory table"):
        offload_values(layer, tmp_path / "again")
