"""Smoke test of the layer micro-benchmark: a tiny --quick run in a subprocess (no timing asserts).

Checks the report's shape and its internal arithmetic (rows/s and bytes/s follow from the medians,
bytes read lie between the fixed bytes and one read per (token, kept row)), not any speed.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # an end-to-end benchmark run in a subprocess

EXPECTED_OURS = {"ultramem_fused", "ultramem_reference", "pkm_ours", "swiglu_ffn"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "layer.json"
    proc = subprocess.run(
        [sys.executable, "-m", "ultramem.bench.layer_bench", "--quick", "--threads", "1",
         "--modes", "decode,train_fb", "--json-out", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    rep = json.loads(last)
    assert json.loads(out.read_text()) == rep
    assert "candidate" in proc.stdout and "targets at" in proc.stdout  # the readable table came first
    return rep


def test_report_has_expected_keys(report):
    for key in ("bench", "quick", "threads", "torch", "copy_GBps", "read_GBps", "configs", "peers",
                "results", "targets"):
        assert key in report
    assert report["bench"] == "layer" and report["quick"] is True and report["threads"] == 1
    assert report["copy_GBps"] > 0 and report["read_GBps"] > 0
    for key in ("speedup_vs_ultra_mem", "met_speedup_vs_ultra_mem", "time_ratio_vs_ffn",
                "met_within_2x_ffn", "all_met"):
        assert key in report["targets"]
    assert set(report["peers"]) == {"ultra_mem", "product_key_memory"}


def test_every_candidate_runs_every_requested_shape(report):
    names = {r["name"] for r in report["results"]}
    assert EXPECTED_OURS <= names
    # A peer is either measured or skipped with a note saying so.
    for module, name in (("ultra_mem", "ultra_mem_peer"), ("product_key_memory", "pkm_peer")):
        assert (name in names) != report["peers"][module].startswith("skipped")
    decode = {(r["name"], r["B"]) for r in report["results"] if r["mode"] == "decode"}
    for name in names - {"ultramem_fused_sparse"}:
        assert {(name, b) for b in (1, 8, 64)} <= decode
    assert any(r["name"] == "ultramem_fused_sparse" and r["mode"] == "train_fb" for r in report["results"])
    assert not any(r["mode"] == "train_fwd" for r in report["results"])  # not requested


def test_rates_follow_from_the_medians(report):
    for r in report["results"]:
        cfg = report["configs"][r["name"]]
        med_s = r["median_ms"] / 1e3
        assert 0 < r["min_ms"] <= r["p25_ms"] <= r["median_ms"] <= r["p75_ms"]
        assert r["cpu_median_ms"] >= 0
        tokens = r["B"] * r["T"]
        assert r["tokens_per_s"] == pytest.approx(tokens / med_s, rel=1e-9)
        assert r["rows_per_s"] == pytest.approx(tokens * cfg["rows_per_token"] / med_s, rel=1e-9)
        assert r["bytes_per_s"] == pytest.approx(r["bytes_read"] / med_s, rel=1e-9)
        # Each distinct row is counted once: between none and one per (token, kept row).
        assert cfg["fixed_bytes"] <= r["bytes_read"]
        assert r["bytes_read"] <= cfg["fixed_bytes"] + tokens * cfg["rows_per_token"] * cfg["row_bytes"]


def test_target_ratios_match_the_table(report):
    t = report["targets"]
    med = {r["name"]: r["median_ms"] for r in report["results"] if r["mode"] == "decode" and r["B"] == 64}
    assert t["time_ratio_vs_ffn"] == pytest.approx(med["ultramem_fused"] / med["swiglu_ffn"])
    assert t["met_within_2x_ffn"] == (t["time_ratio_vs_ffn"] <= 2.0)
    if "ultra_mem_peer" in med:
        assert t["speedup_vs_ultra_mem"] == pytest.approx(med["ultra_mem_peer"] / med["ultramem_fused"])
    else:
        assert t["speedup_vs_ultra_mem"] is None and t["all_met"] is False


def test_missing_peer_is_skipped_with_a_note(monkeypatch):
    from ultramem.bench import layer_bench as lb
    from ultramem.bench import peers

    real_import = peers.importlib.import_module

    def fake_import(name, *args, **kwargs):
        if name in ("ultra_mem", "product_key_memory"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(peers.importlib, "import_module", fake_import)
    notes = {}
    names = {c.name for c in lb.build_candidates(lb.shapes(quick=True), notes)}
    assert EXPECTED_OURS <= names and not names & {"ultra_mem_peer", "pkm_peer"}
    assert notes["ultra_mem"].startswith("skipped") and "ultra-mem==0.1.2" in notes["ultra_mem"]
    assert notes["product_key_memory"].startswith("skipped")
    rows = [{"name": n, "mode": "decode", "B": 64, "median_ms": 1.0, "min_ms": 0.5, "cpu_median_ms": 1.0}
            for n in ("ultramem_fused", "swiglu_ffn")]
    t = lb.targets(rows, (1, 64))
    assert t["speedup_vs_ultra_mem"] is None and t["met_speedup_vs_ultra_mem"] is None
    assert t["met_within_2x_ffn"] is True and t["all_met"] is False
