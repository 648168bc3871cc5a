"""Report analyses: the scaling fit recovers a known slope, sweep/ablation tables list unfinished
points instead of inventing them, retrieval curves average seeds, and the probe evaluates a
trained run under every search. Committed configs are exactly what the suite code writes."""

import json
import math
from pathlib import Path

import pytest

from ultramem.experiments import analysis, report, suites

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"


def _result(root, suite, name, group, seed, val_loss, sparse=0, flops=1_000_000, evals=()):
    out = root / "results" / suite
    out.mkdir(parents=True, exist_ok=True)
    r = {"name": name, "group": group, "seed": seed, "suite": suite, "tokens": 1000, "step": 10,
         "val_loss": val_loss, "tokens_per_s": 100.0,
         "params": {"total": 1, "activated": 1, "sparse": sparse, "flops_per_token": flops}}
    (out / f"{name}.json").write_text(json.dumps(r))
    lines = [{"kind": "train", "step": 10, "tokens": 1000, "loss": val_loss}]
    lines += [{"kind": "eval", "step": step, "val_loss": val_loss, **mem} for step, mem in evals]
    (out / f"{name}.metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return r


def test_fit_recovers_a_known_log_slope():
    xs = [1e6, 2e6, 4e6, 8e6]
    ys = [4.0 - 0.05 * math.log(x) for x in xs]
    f = analysis.fit_log_linear(xs, ys)
    assert f["slope"] == pytest.approx(-0.05)
    assert f["per_doubling"] == pytest.approx(-0.05 * math.log(2))
    assert f["r2"] == pytest.approx(1.0)
    noisy = analysis.fit_log_linear(xs + xs, ys + [y + 0.01 for y in ys])
    assert noisy["slope"] == pytest.approx(-0.05) and noisy["slope_se"] < 1e-9 + 0.01
    with pytest.raises(ValueError, match="distinct x"):
        analysis.fit_log_linear([1e6, 1e6], [3.0, 3.1])


def test_scaling_table_fits_each_sparsity(tmp_path):
    groups = {}
    for sp in (512, 2048):
        for ratio in (2, 4, 8):
            for seed in (0, 1):
                loss = 4.0 - 0.1 * math.log(ratio * 1e6) + 0.01 * seed - (0.05 if sp == 512 else 0)
                r = _result(tmp_path, "scaling", f"sp{sp}-x{ratio:02d}-s{seed}", f"sp{sp}-x{ratio:02d}",
                            seed, loss, sparse=ratio * 1_000_000)
                groups.setdefault(r["group"], []).append(r)
    table = analysis.scaling_table(groups)
    assert table.count("-0.1000") == 2 and "| 512 | 6 |" in table and "| 2048 | 6 |" in table
    per_doubling = f"{-0.1 * math.log(2):+.4f}"  # each seed alone has the same exact slope
    assert table.count(f"s0 {per_doubling} (3 sizes), s1 {per_doubling} (3 sizes)") == 2
    # seed 1 finished only the smallest size at sparsity 512: listed, not fitted
    part = {k: [r for r in v if r["seed"] == 0 or k != "sp512-x04" and k != "sp512-x08"]
            for k, v in groups.items()}
    row = next(x for x in analysis.scaling_table(part).splitlines() if x.startswith("| 512 |"))
    assert "| 512 | 4 |" in row and f"s0 {per_doubling} (3 sizes), s1 1 size(s), no fit" in row
    assert analysis.plot_scaling(groups, tmp_path / "fit.png").stat().st_size > 0
    one = {"sp512-x02": groups["sp512-x02"]}
    assert analysis.sparsity_table(one) == ""  # nothing to compare with one sparsity
    assert "too few sizes finished" in analysis.scaling_table(one)


def test_sparsity_table_pairs_ratios_and_never_fills_a_gap(tmp_path):
    groups = {}
    for sp, offset in ((512, -0.05), (2048, 0.0)):
        for ratio in (2, 4):
            for seed in (0, 1):
                if sp == 512 and ratio == 4 and seed == 1:
                    continue  # unfinished
                loss = 3.8 - 0.01 * ratio + offset + 0.002 * seed
                r = _result(tmp_path, "scaling", f"sp{sp}-x{ratio:02d}-s{seed}", f"sp{sp}-x{ratio:02d}",
                            seed, loss)
                groups.setdefault(r["group"], []).append(r)
    groups["sp512-x08"] = []  # configured, nothing finished
    rows = analysis.sparsity_table(groups).splitlines()
    assert rows[0].startswith("| sparse / dense | sparsity 2048: val loss per seed | sparsity 512:")
    x2, x4, x8 = (next(r for r in rows if r.startswith(f"| x{k} |")) for k in (2, 4, 8))
    assert "s0 3.780, s1 3.782 (mean 3.781 ± 0.001)" in x2 and "| -0.050 | yes (ranges disjoint) |" in x2
    assert "s0 3.710 (mean 3.710)" in x4 and "| -0.050 | n/a (1 seed) |" in x4  # seed 0 against seed 0
    assert "not finished" in x8 and x8.endswith("| - | - |")


def test_sweeps_table_reports_against_the_base_and_lists_unfinished():
    base = [{"val_loss": 3.8, "params": {"flops_per_token": 2_000_000}},
            {"val_loss": 3.9, "params": {"flops_per_token": 2_000_000}}]
    groups = {"ive-E1": [{"val_loss": 4.0, "params": {"flops_per_token": 1_800_000}}], "ive-E9": []}
    table = analysis.sweeps_table(groups, base, report.PAPER_SWEEP_DELTA)
    assert "| base E4-r2-h2 (= main ultramem) | 2 | 2.00 | +0.0% | 3.850 ± 0.050 | - | - |" in table
    assert "| ive-E1 | 1 | 1.80 | -10.0% | 4.000 | +0.150 | n/a (1 seed) | +0.017 |" in table
    assert "| ive-E9 | not finished |" in table


def test_ablation_table_never_invents_a_delta():
    groups = {"01-pkm": [{"val_loss": 3.9}], "03-half-vdim-proj": [{"val_loss": 3.8}]}
    table = report.ablation_table(groups, ["01-pkm", "02-rm-softmax", "03-half-vdim-proj"])
    assert "| 02-rm-softmax | not finished | | | | -0.006 |" in table
    assert "| 03-half-vdim-proj | 1 | 3.800 | - | - | -0.022 |" in table  # predecessor unfinished


def test_seed_noise_verdict():
    assert report.separated([3.80, 3.82], [3.90, 3.85]) == "yes (ranges disjoint)"
    assert report.separated([3.80, 3.86], [3.90, 3.85]) == "no (ranges overlap)"
    assert report.separated([3.80], [3.90, 3.85]) == "n/a (1 seed)"
    groups = {"01-pkm": [{"val_loss": 3.9}, {"val_loss": 3.92}],
              "02-rm-softmax": [{"val_loss": 3.8}, {"val_loss": 3.81}]}
    assert "| 02-rm-softmax | 2 | 3.805 ± 0.005 | -0.105 | yes (ranges disjoint) | -0.006 |" in \
        report.ablation_table(groups)


def test_retrieval_curves_average_seeds(tmp_path):
    runs = [_result(tmp_path, "main", f"um-s{s}", "um", s, 3.0,
                    evals=[(5, {"mem0_recall": 0.5 + 0.1 * s, "mem0_rows_used": 0.2}),
                           (10, {"mem0_recall": 0.3 + 0.1 * s, "mem0_rows_used": 0.4})]) for s in (0, 1)]
    curves = analysis.memory_curves(tmp_path, "main", runs)
    assert curves["mem0_recall"] == [(500.0, pytest.approx(0.55)), (1000.0, pytest.approx(0.35))]
    table = analysis.retrieval_table(tmp_path, "main", {"um": runs})
    assert "| um | 2 | 0 | 0.550 → 0.350 | 0.200 → 0.400 | - | - | - |" in table
    assert analysis.plot_retrieval(tmp_path, "main", {"um": runs}, tmp_path / "r.png").exists()
    dense = [_result(tmp_path, "main", "d-s0", "d", 0, 3.0, evals=[(10, {})])]
    assert analysis.retrieval_table(tmp_path, "main", {"d": dense}) == ""


def test_collapse_is_flagged_per_seed_not_hidden_by_the_mean():
    runs = [{"seed": 0, "mem0_rows_read_train": 0.95, "mem1_rows_read_train": 0.2},
            {"seed": 1, "mem0_rows_read_train": 0.9, "mem1_rows_read_train": 0.97}]
    assert analysis.collapsed_seeds(runs, 0) == "no"
    assert analysis.collapsed_seeds(runs, 1) == "seed 0"  # the mean (0.585) would pass
    assert analysis.collapsed_seeds(runs, 2) == "-"


@pytest.mark.parametrize("suite", sorted(suites.SUITES))
def test_committed_configs_are_what_the_suite_code_writes(suite, tmp_path):
    folder = CONFIGS / suite
    committed = sorted(p.name for p in folder.glob("*.json"))
    written = suites.write_configs(tmp_path, [suite])
    assert committed == sorted(p.name for p in written)  # no stale or missing config
    for p in written:
        assert json.loads(p.read_text()) == json.loads((folder / p.name).read_text())


def test_sweep_base_is_main_ultramem():
    main = {r["group"]: r for r in suites.main_suite()}
    assert suites.ULTRAMEM == main[report.SWEEP_BASE[1]]["model"]
    assert all(r["model"] != suites.ULTRAMEM for r in suites.sweeps_suite())  # not run twice


def _capacity_result(root, kind, people, seed, seen, heldout):
    name = f"{kind}-p{people:04d}-s{seed}"
    r = _result(root, "capacity", name, f"{kind}-p{people:04d}", seed, 1.0,
                evals=[(5, {"fact_acc_seen": seen / 2}), (10, {"fact_acc_seen": seen})])
    r.update(fact_acc_seen=seen, fact_acc_heldout=heldout,
             spec={"data": {"source": "facts", "num_people": people}, "train": {"fact_queries": 600}})
    (root / "results" / "capacity" / f"{name}.json").write_text(json.dumps(r))
    return r


def test_capacity_table_counts_facts_and_tests_seed_noise(tmp_path):
    """Facts = people x 5 attributes, stored facts = the rate corrected for the majority-answer
    baseline of the same questions; a kind's Δ to dense is called beyond seed noise only when the
    two seed ranges are disjoint; a missing size stays 'not finished'."""
    groups = {}
    rates = {("dense", 100): (0.9, 0.8), ("dense", 1000): (0.3, 0.2),
             ("ultramem", 100): (0.88, 0.78), ("ultramem", 1000): (0.5, 0.23)}
    for (kind, people), (seen, held) in rates.items():
        for seed, jitter in ((0, 0.0), (1, 0.04)):
            r = _capacity_result(tmp_path, kind, people, seed, seen + jitter, held + jitter)
            groups.setdefault(r["group"], []).append(r)
    groups["pkm-p0100"] = [_capacity_result(tmp_path, "pkm", 100, 0, 0.5, 0.4)]
    from ultramem.experiments import capacity

    table = capacity.capacity_table(groups)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert rows["100"].split(" | ")[1] == "500" and rows["1,000"].split(" | ")[1] == "5,000"
    chance = capacity.chance_rates(groups["dense-p1000"][0])
    assert 0.02 < chance["fact_acc_seen"] < 0.3 and 0.02 < chance["fact_acc_heldout"] < 0.3
    assert capacity.stored(chance["fact_acc_seen"], chance["fact_acc_seen"], 5000) == 0  # guessing
    assert capacity.stored(0.0, 0.1, 5000) == 0 and capacity.stored(1.0, 0.1, 5000) == 5000
    # ultramem seen: mean 0.52 of 5,000 facts, corrected for guessing
    assert f"0.520 ± 0.020 ({capacity.stored(0.52, chance['fact_acc_seen'], 5000):,.0f})" in rows["1,000"]
    assert "+0.200 yes / +0.030 no" in rows["1,000"]  # seen ranges disjoint, held-out overlap
    assert "-0.020 no / -0.020 no" in rows["100"]
    assert "not finished" in rows["1,000"] and "n/a" in rows["100"]  # pkm: one size, one seed
    configured = capacity.capacity_table(groups, configured=["pkm-p0100", "pkm-p1000"]).splitlines()
    assert "not finished" in configured[-1]  # pkm at 1,000 is in the suite, not run yet
    assert "not finished" not in capacity.capacity_table(groups, configured=["pkm-p0100"])  # not in it
    assert capacity.curve_size(capacity.capacity_points(groups)) == 1000  # dense's first size under 0.5
    assert capacity.plot_capacity(tmp_path, "capacity", groups, tmp_path / "c.png").stat().st_size > 0
    (tmp_path / "configs" / "capacity").mkdir(parents=True)
    text = report.write_report(tmp_path, "capacity").read_text()
    assert "capacity.png" in text and rows["1,000"].replace("not finished", "-") in text  # no configs
