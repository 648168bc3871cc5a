"""The training-throughput benchmark runs end to end and reports every model and the target."""

import pytest

import ultramem.bench.train_bench as tb


def test_train_bench_reports_all_models(monkeypatch):
    tiny = {"dense": {"dim": 16, "n_layers": 1, "n_heads": 2, "ffn": "dense"},
            "ultramem": {"dim": 16, "n_layers": 1, "n_heads": 2, "ffn": "ultramem", "memory_placement": "0:0",
                         "memory": {"num_keys": 4, "key_dim": 8, "value_dim": 8, "topk": 2}}}
    monkeypatch.setattr(tb, "model_sets", lambda name: (tiny, 40, 2, 8))
    res = tb.run("tiny", threads=1, budget=0.01, reps=3)
    assert set(res["runs"]) == {"dense", "ultramem"}
    dense, um = res["runs"]["dense"], res["runs"]["ultramem"]
    for r in (dense, um):
        assert r["median_ms"] > 0 and r["tokens_per_s"] > 0
    # the ratio is UltraMem's speed over dense's, from their own medians (not dense over itself)
    assert um["vs_dense"] == pytest.approx(dense["median_ms"] / um["median_ms"], rel=1e-6)
    assert res["target"]["met"] == (um["vs_dense"] >= 0.6)
    assert um["total"] > dense["total"]  # the memory's table is in the count
    both = tb.run("tiny", threads=1, budget=0.01, reps=3, dtypes=("fp32", "bf16"))
    assert set(both["runs"]) == {"dense", "ultramem", "dense/bf16", "ultramem/bf16"}
    assert both["runs"]["dense"]["vs_first_dtype"] is None
    assert both["runs"]["ultramem/bf16"]["vs_first_dtype"] > 0


def test_train_bench_rejects_unknown_dtype():
    with pytest.raises(ValueError, match="--dtype"):
        tb.run("tiny", dtypes=("fp16",))
