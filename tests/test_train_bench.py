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
    assert res["runs"]["dense"]["vs_dense"] == 1.0
    assert res["target"]["met"] == (res["runs"]["ultramem"]["vs_dense"] >= 0.6)
    assert res["runs"]["ultramem"]["total"] > res["runs"]["dense"]["total"]
    both = tb.run("tiny", threads=1, budget=0.01, reps=3, dtypes=("fp32", "bf16"))
    assert set(both["runs"]) == {"dense", "ultramem", "dense/bf16", "ultramem/bf16"}
    r = both["runs"]["ultramem/bf16"]
    assert r["vs_first_dtype"] == both["runs"]["ultramem"]["median_ms"] / r["median_ms"]
    assert both["runs"]["dense"]["vs_first_dtype"] is None


def test_train_bench_rejects_unknown_dtype():
    with pytest.raises(ValueError, match="--dtype"):
        tb.run("tiny", dtypes=("fp16",))
