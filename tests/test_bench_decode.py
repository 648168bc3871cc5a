"""The decode benchmark end to end on a tiny config (no timing assertions), and its CLI surface."""

import argparse
import json
from dataclasses import replace

import pytest

from ultramem.bench import decode
from ultramem.bench.decode_report import evaluate_targets, write_outputs

pytestmark = pytest.mark.slow  # an end-to-end benchmark run in a subprocess

TINY = replace(decode.quick_shapes(), dim=32, expert_hidden=64, experts=8,
               um=dict(key_dim=8, value_dim=16, heads=2, topk=4, value_expansion=4),
               pkm=dict(key_dim=16, heads=2, topk=4, query_norm="layer"),
               v2=dict(key_dim=8, heads=1, topk=8, value_dim=12, pre_value_dim=4, share_group=1),
               batches=(1, 4), ratios=(2, 8), sweep_batch=4, vocab=64, n_layers=2, n_heads=2, ctx=8,
               gen_batches=(1, 2), gen_prompt=2, gen_new=2, budget_s=0.0, model_budget_s=0.0, min_reps=2,
               max_reps=2, warmup=1, copy_mb=4, gen_presets=False)


@pytest.fixture(scope="module")
def report():
    return decode.run(TINY, device="cpu", dtype="fp32", peers=False, threads=1, log=lambda _m: None)


def test_every_candidate_batch_and_ratio_is_measured(report):
    recs = report["records"]
    layer = {(r["name"], r["B"]) for r in recs if r["level"] == "layer" and r["sweep"] == "batch"}
    names = {"dense", "moe", "ultramem", "ultramem_mem", "pkm", "pkm_mem", "ultramem_v2", "ultramem_v2_mem"}
    assert layer == {(n, B) for n in names for B in TINY.batches}
    model = {(r["name"], r["B"]) for r in recs if r["level"] == "model" and r["sweep"] == "batch"}
    assert model == {(n, B) for n in ("dense", "moe", "ultramem", "pkm", "ultramem_v2") for B in TINY.batches}
    for level in ("layer", "model"):
        sweep = {(r["name"], r["ratio"]) for r in recs if r["level"] == level and r["sweep"] == "ratio"}
        assert sweep == {(n, r) for n in ("dense", "moe", "ultramem", "ultramem_anchor") for r in TINY.ratios}
    for r in recs:
        assert r["reps"] == 2 and r["p25_ms"] <= r["median_ms"] <= r["p75_ms"]
        assert r["bytes_total"] > 0 and r["tokens_per_s"] > 0
    assert {(g["name"], g["B"]) for g in report["generation"]} == {
        (n, B) for n in ("dense", "moe", "ultramem", "pkm", "ultramem_v2") for B in TINY.gen_batches}


def test_bytes_follow_the_accounting_rules(report):
    def rec(level, name, B):
        return next(r for r in report["records"] if r["level"] == level and r["sweep"] == "batch"
                    and r["name"] == name and r["B"] == B)
    dense = rec("layer", "dense", 1)["bytes"]
    assert dense["total"] == dense["dense_weights"] == 3 * TINY.dim * 2 * TINY.expert_hidden * 4
    assert rec("layer", "dense", 4)["bytes_total"] == dense["total"]  # batch-independent
    moe = rec("layer", "moe", 1)["bytes"]
    assert moe["distinct_experts"] <= TINY.moe_topk
    for name in ("moe", "ultramem", "pkm", "ultramem_v2"):  # more tokens never touch less
        assert rec("layer", name, 4)["bytes_total"] >= rec("layer", name, 1)["bytes_total"]
    m = rec("model", "dense", 4)["bytes"]
    assert m["kv_cache"] == 2 * TINY.n_layers * 4 * (TINY.ctx + 1) * TINY.dim * 4
    configs = report["configs"]["layer"]
    assert configs["ultramem"]["total"] == pytest.approx(configs["moe"]["total"], rel=0.05)
    assert configs["ultramem"]["activated"] == pytest.approx(configs["moe"]["activated"], rel=0.05)
    for level in ("layer", "model"):  # V2 is matched like v1 (its own pool per layer in the bench LM)
        v2, moe_ = report["configs"][level]["ultramem_v2"], report["configs"][level]["moe"]
        assert v2["total"] == pytest.approx(moe_["total"], rel=0.05)
        assert v2["activated"] == pytest.approx(moe_["activated"], rel=0.05)


def test_outputs_json_markdown_and_pngs(report, tmp_path):
    paths = write_outputs(report, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert len(data["records"]) == len(report["records"])
    md = paths["markdown"].read_text()
    for heading in ("## Layer-level candidates", "## Layer level, median latency", "## Model level detail",
                    "sparse-ratio sweep", "## Generation", "## Targets"):
        assert heading in md
    names = sorted(p.name for p in paths["plots"])
    assert names == ["bytes_vs_batch.png", "latency_vs_batch.png", "latency_vs_ratio.png"]
    for p in paths["plots"]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_targets_are_judged_from_the_records(report):
    fake = json.loads(json.dumps(report))  # deep copy
    for r in fake["records"]:  # make UltraMem 4x faster than MoE and flat across ratios
        r["median_ms"] = 4.0 if r["name"] == "moe" else 1.0
    fake["shapes"]["batches"] = [8, 64]
    for r in fake["records"]:
        if r["sweep"] == "batch":
            r["B"] = {1: 8, 4: 64}[r["B"]]
    met = {t["target"].split(":")[0] + str(i): t["met"] for i, t in enumerate(evaluate_targets(fake))}
    assert all(met.values()), met
    for r in fake["records"]:
        if r["name"] == "ultramem":
            r["median_ms"] = 2.5
    assert [t["met"] for t in evaluate_targets(fake)] == [False, False, False, False]


def test_cli_surface():
    sub = argparse.ArgumentParser().add_subparsers(dest="cmd")
    decode.register(sub)
    assert set(sub.choices) == {"decode", "generate-speed"}
    a = sub.choices["decode"].parse_args(["--quick", "--parts", "layer", "--no-peers"])
    assert a.quick and a.parts == "layer" and a.no_peers and a.handler is decode.run_from_args
    with pytest.raises(ValueError, match="--parts"):
        decode.main(["--parts", "layer,bogus"])
    with pytest.raises(ValueError, match="--batches"):
        decode.main(["--batches", "0,4"])


def test_peer_bytes_agree_with_the_layer_benchmarks_count():
    pytest.importorskip("ultra_mem")
    pytest.importorskip("product_key_memory")
    import torch

    sh = replace(TINY, pkm=dict(key_dim=16, heads=2, topk=4))
    ours = decode._layer_cands(sh, 4, torch.device("cpu"), torch.float32, ("ultramem", "pkm"), mem_alone=True)
    notes = {}
    peers = {c.name: c for c in decode._peer_cands(sh, ours, torch.device("cpu"), torch.float32, 8, notes)}
    assert {"ultra_mem_peer", "pkm_peer"} <= set(peers)
    x = torch.randn(6, 1, sh.dim)
    with torch.no_grad():
        for name in ("ultra_mem_peer", "pkm_peer"):
            c = peers[name]
            b = c.bytes_fn(x)
            assert b["total"] == b["dense_weights"] + b["value_rows"] and b["distinct_rows"] > 0
            assert c.counts["sparse"] < c.counts["total"]
