"""Smoke runs of `ultramem bench scale` and `ultramem bench kernels` at tiny sizes (CPU)."""

import json

import pytest

from ultramem.bench import kernels_bench, scale_bench


@pytest.mark.slow
def test_scale_bench_prints_rows_and_one_json_line(capsys):
    assert scale_bench.main(["--sizes", "0.01", "--batches", "1,2", "--budget", "0.05", "--compare"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    want = {(p, b) for p in ("full", "default") for b in (1, 2)}
    assert {(r["path"], r["B"]) for r in result["rows"]} == want
    row = result["rows"][0]
    # bytes: every dense parameter once plus the distinct value rows read
    assert row["bytes"] == row["dense_bytes"] + row["value_rows"] * 256 * 4 and row["value_rows"] > 0
    assert row["bound_ms"] > 0 and row["ratio_to_bound"] > 0
    assert "b8_over_b1" not in result["summary"] and "speedup_vs_full_cpu" in result["summary"]


@pytest.mark.slow
def test_kernels_bench_quick_writes_json_and_markdown(tmp_path, capsys):
    assert kernels_bench.main(["--quick", "--device", "cpu", "--parts", "lookup,search", "--budget", "0.05",
                               "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["triton"] is False  # no CUDA here: torch paths only
    assert {r["impl"] for r in result["lookup"]} == {"embedding_bag", "reference"}
    assert (tmp_path / "kernels.json").exists() and (tmp_path / "kernels.md").exists()


@pytest.mark.slow
def test_gpu_bench_script_runs_its_benchmarks_in_smoke_mode(tmp_path):
    """scripts/gpu_bench.sh has never met a GPU here: SMOKE=1 runs its two benchmark commands (same
    flags, --device cpu --quick) so a renamed flag or a broken output path shows up in CI."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "SMOKE": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(repo / "scripts/gpu_bench.sh"), str(tmp_path)], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kernels = json.loads((tmp_path / "kernels_line.json").read_text())
    decode = json.loads((tmp_path / "decode_line.json").read_text())
    assert kernels["lookup"] and kernels["train"]["tokens_per_s"]["ultramem"] > 0
    assert {(r["level"], r["B"]) for r in decode["records"] if r["sweep"] == "batch"} >= {
        (level, B) for level in ("layer", "model") for B in (1, 2)}
    assert (tmp_path / "kernels.md").exists() and (tmp_path / "decode" / "decode.json").exists()
