"""Experiment suites: configs are valid and matched, the runner skips finished runs and resumes
interrupted ones, and the report lists unfinished runs instead of inventing them."""

import json
import os
import subprocess
import sys

import pytest

from ultramem.experiments import report, runner, suites
from ultramem.train import RunConfig

TINY_TRAIN = {"steps": 4, "batch_size": 2, "seq_len": 16, "warmup_steps": 1, "eval_every": 2,
              "eval_windows": 2, "fact_queries": 3, "log_every": 1, "ckpt_every": 2, "threads": 1,
              "progress": False}
TINY_DATA = {"source": "facts", "num_people": 10, "vocab_size": 300, "fact_repetitions": 2}


def _write(root, name, kind, seed, **train):
    model = {"dim": 32, "n_layers": 2, "n_heads": 2, "ffn": kind}
    if kind == "ultramem":
        model.update(memory_placement="0:1", memory={"num_keys": 8, "key_dim": 8, "value_dim": 16,
                                                     "heads": 1, "topk": 4})
    cfg = {"name": f"{name}-s{seed}", "group": name, "seed": seed, "model": model, "data": TINY_DATA,
           "train": {**TINY_TRAIN, "seed": seed, **train}}
    path = root / "configs" / "tiny" / f"{name}-s{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("suite", sorted(suites.SUITES))
def test_every_suite_config_is_valid(suite):
    runs = suites.SUITES[suite]()
    assert len({r["name"] for r in runs}) == len(runs)
    for r in runs:
        RunConfig.from_dict({k: r[k] for k in ("model", "data", "train")})  # raises on a bad config
    seeds = {}
    for r in runs:
        seeds.setdefault(r["group"], set()).add(r["seed"])
    assert all(len(s) >= 2 for s in seeds.values())  # every claimed comparison has 2 seeds


def test_main_suite_is_matched():
    counts = suites.check_matching()
    assert counts["moe"]["sparse"] > 8 * counts["dense"]["activated"]  # ~x11 sparse, as planned


def test_fair_suite_is_matched_and_ultramem_keys_are_at_most_a_tenth_of_activated():
    import torch

    from ultramem.model import LanguageModel, LMConfig

    counts = suites.check_matching(models=suites.FAIR)
    assert counts["moe"]["sparse"] > 8 * counts["dense"]["activated"]
    with torch.random.fork_rng():
        model = LanguageModel(LMConfig.from_dict({**suites.FAIR["ultramem"], "vocab_size": suites.VOCAB,
                                                  "max_seq_len": suites.SEQ}))
    keys = sum(p.numel() for n, p in model.named_parameters() if n.endswith((".keys_row", ".keys_col")))
    assert 0 < keys <= 0.10 * counts["ultramem"]["activated"]


def test_runner_skips_done_and_resumes_started(tmp_path):
    cfg_a = _write(tmp_path, "dense", "dense", 0)
    _write(tmp_path, "um", "ultramem", 0)
    result = runner.run_one(tmp_path, "tiny", cfg_a)
    assert result["step"] == 4 and result["tokens"] == 4 * 2 * 16
    assert runner.status(tmp_path, "tiny") == {"done": ["dense-s0"], "stale": [], "running": [],
                                               "started": [], "pending": ["um-s0"]}
    # Interrupt um after 2 steps (checkpoint kept), then resume it to the end.
    cfg_b = _write(tmp_path, "um", "ultramem", 0, stop_after=2)
    from ultramem.train import train

    spec = json.loads(cfg_b.read_text())
    train(RunConfig.from_dict({"model": spec["model"], "data": spec["data"],
                               "train": {**spec["train"], "out_dir": str(tmp_path / "runs/tiny/um-s0"),
                                         "cache_dir": str(tmp_path / "cache")}}), log=lambda *_: None)
    assert runner.status(tmp_path, "tiny")["started"] == ["um-s0"]
    _write(tmp_path, "um", "ultramem", 0)
    assert runner.progress(tmp_path, "tiny", "um-s0") == (2, 4)  # logged step, configured steps
    assert runner.progress(tmp_path, "tiny", "never-run") is None
    from ultramem.experiments.cli import _with_checkpoint

    assert _with_checkpoint(tmp_path, "tiny", "um-s0") == "um-s0 (checkpoint at step 2/4)"  # status line
    assert runner.run_suite(tmp_path, "tiny", jobs=1) == 0
    done = json.loads((tmp_path / "results/tiny/um-s0.json").read_text())
    assert done["step"] == 4
    # The runner's segment ran under this checkout: its version, recorded once.
    assert done["code_versions"] == [runner.code_version()]
    steps = [json.loads(x)["step"] for x in
             (tmp_path / "results/tiny/um-s0.metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == [1, 2, 3, 4]  # resumed at 2, not restarted

    md = report.write_report(tmp_path, "tiny").read_text()
    assert "| dense | 1 |" in md and "| um | 1 |" in md
    assert "not finished: none" in md


def test_a_result_from_an_edited_config_is_stale_not_done(tmp_path, capsys):
    cfg = _write(tmp_path, "dense", "dense", 0)
    result = runner.run_one(tmp_path, "tiny", cfg)
    assert result["spec"] == json.loads(cfg.read_text())
    assert runner.run_suite(tmp_path, "tiny", jobs=1) == 0  # unchanged: skipped as done
    _write(tmp_path, "dense", "dense", 0, lr=1e-4)  # the config is edited after the run finished
    assert runner.status(tmp_path, "tiny")["stale"] == ["dense-s0"]
    assert runner.status(tmp_path, "tiny")["done"] == []
    capsys.readouterr()
    assert runner.run_suite(tmp_path, "tiny", jobs=1) == 1  # refused loudly, never rerun silently
    assert "STALE tiny/dense-s0" in capsys.readouterr().out
    assert json.loads((tmp_path / "results/tiny/dense-s0.json").read_text()) == result  # untouched
    md = report.write_report(tmp_path, "tiny").read_text()
    assert "| dense | 1 |" not in md and "not finished: dense-s0 (stale: config changed)" in md
    # A result written before specs were recorded counts as current.
    path = tmp_path / "results/tiny/dense-s0.json"
    legacy = json.loads(path.read_text())
    del legacy["spec"]
    path.write_text(json.dumps(legacy))
    assert runner.status(tmp_path, "tiny")["done"] == ["dense-s0"]


def test_report_lists_unfinished(tmp_path):
    _write(tmp_path, "dense", "dense", 0)
    md = report.write_report(tmp_path, "tiny").read_text()
    assert "not finished: dense-s0" in md


def _result(loss):
    return {"val_loss": loss, "tokens": 4096, "tokens_per_s": 100.0,
            "params": {"total": 1e6, "activated": 5e5, "flops_per_token": 1e6}}


def test_group_table_compares_with_every_reference_group_and_the_paper():
    groups = {"dense": [_result(3.0), _result(3.1)], "moe": [_result(2.9), _result(2.95)],
              "ultramem": [_result(2.92), _result(2.94)]}
    table = report.group_table(groups, paper=report.PAPER_MAIN_151M, versus=("dense", "moe", "pkm"))
    head, _, dense, moe, um = table.splitlines()
    assert "Δ val loss vs dense" in head and "Δ val loss vs moe" in head and "vs pkm" not in head
    cells = [c.strip() for c in um.strip("|").split("|")]
    # ultramem: -0.120 vs dense (ranges disjoint), +0.005 vs MoE (overlap), paper 2.67 - 2.96
    assert cells[-5:] == ["-0.120", "yes (ranges disjoint)", "+0.005", "no (ranges overlap)", "-0.290"]
    assert [c.strip() for c in dense.strip("|").split("|")][-5:-3] == ["+0.000", "-"]
    assert [c.strip() for c in moe.strip("|").split("|")][-3:-1] == ["+0.000", "-"]


def test_unknown_suite_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="suite: unknown 'nope'"):
        suites.write_configs(tmp_path, ["nope"])
    with pytest.raises(ValueError, match="no configs"):
        runner.status(tmp_path, "missing")


def test_probe_evaluates_a_trained_run_under_every_search(tmp_path):
    from ultramem.experiments.probe import probe_run

    cfg = _write(tmp_path, "um", "ultramem", 0)
    runner.run_one(tmp_path, "tiny", cfg)
    rows = probe_run(str(tmp_path / "runs/tiny/um-s0"), stage1=[16], log=lambda *_: None)
    got = [(r["search"], r["stage1_topk"]) for r in rows]
    assert got == [("rank1", 4), ("rank1_both_signs", 4), ("exact", 4),
                   ("rank1", 16), ("rank1_both_signs", 16)]
    assert all(r["val_loss"] > 0 and 0 <= r["mem0_recall"] <= 1 for r in rows)
    assert rows[2]["mem0_recall"] == 1.0  # the oracle agrees with itself
    assert rows[3]["mem0_recall"] == 1.0  # m1 = n' = 16: stage 1 filters nothing


def test_an_interrupted_run_writes_no_result_and_is_resumed(tmp_path, monkeypatch):
    """SIGINT stops the trainer after a checkpoint: the runner must not file that as a finished run
    (it did: a stopped MoE run was reported at step 810 of 1,000), and the next run resumes it."""
    import signal

    from ultramem import train as train_mod

    cfg = _write(tmp_path, "dense", "dense", 0)
    loop = train_mod._loop

    def interrupted_loop(s):
        signal.raise_signal(signal.SIGINT)  # caught by the trainer's own handler, as a Ctrl-C would be
        loop(s)

    monkeypatch.setattr(train_mod, "_loop", interrupted_loop)
    summary = runner.run_one(tmp_path, "tiny", cfg)
    monkeypatch.undo()
    assert summary["interrupted"] == signal.SIGINT and summary["step"] < 4
    assert not (tmp_path / "results/tiny/dense-s0.json").exists()
    assert runner.status(tmp_path, "tiny")["started"] == ["dense-s0"]
    assert runner.run_one(tmp_path, "tiny", cfg)["step"] == 4
    assert runner.status(tmp_path, "tiny")["done"] == ["dense-s0"]


def test_the_suite_log_names_an_interrupted_child_apart_from_a_failed_one():
    assert runner._child_state(0) == "finished"
    assert runner._child_state(130).startswith("interrupted (signal 2")  # 128 + SIGINT, from __main__
    assert runner._child_state(1) == "FAILED (exit 1)"
    assert runner._child_state(-9) == "FAILED (exit -9)"  # killed outright: no checkpoint promised


def test_a_run_being_trained_is_never_started_twice(tmp_path, monkeypatch):
    cfg = _write(tmp_path, "dense", "dense", 0)
    run_dir = tmp_path / "runs/tiny/dense-s0"
    run_dir.mkdir(parents=True)
    # A live foreign owner (our parent process stands in for another runner): refused and skipped.
    (run_dir / "running.pid").write_text(str(os.getppid()))
    with pytest.raises(RuntimeError, match="already being trained by process"):
        runner.run_one(tmp_path, "tiny", cfg)
    assert runner.status(tmp_path, "tiny")["running"] == ["dense-s0"]
    assert runner.run_suite(tmp_path, "tiny", jobs=1) == 0
    assert not (tmp_path / "results/tiny/dense-s0.json").exists()
    # ... and it takes one of the `jobs` slots: with jobs=1 the next run waits for it to end.
    _write(tmp_path, "um", "ultramem", 0)
    waits = []

    def fake_sleep(_):
        waits.append(1)
        if len(waits) == 3:
            (run_dir / "running.pid").unlink()  # the other process finished

    monkeypatch.setattr(runner.time, "sleep", fake_sleep)
    assert runner.run_suite(tmp_path, "tiny", jobs=1) == 0
    monkeypatch.undo()
    assert len(waits) >= 3 and (tmp_path / "results/tiny/um-s0.json").exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    # A stale lock (its owner is gone) is taken over, and released when the run ends.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / "running.pid").write_text(str(dead.pid))
    assert runner.run_one(tmp_path, "tiny", cfg)["step"] == 4
    assert not (run_dir / "running.pid").exists()


def test_several_suites_share_one_queue_seed_zero_first(tmp_path, monkeypatch):
    for suite, names in (("a", ["x", "facts-y"]), ("b", ["z"])):
        for name in names:
            for seed in (0, 1):
                path = tmp_path / "configs" / suite / f"{name}-s{seed}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("{}")
    started = []

    class FakeProc:
        def __init__(self, cmd):
            started.append(f"{cmd[-2]}/{os.path.basename(cmd[-1])[:-5]}")
            self.returncode, self.pid = 0, 10**9 + len(started)

        def poll(self):
            return 0

    monkeypatch.setattr(runner.subprocess, "Popen", FakeProc)
    monkeypatch.setattr(runner.time, "sleep", lambda s: None)
    assert runner.run_suite(tmp_path, ["a", "b"], jobs=1) == 0
    assert started == ["a/x-s0", "b/z-s0", "a/x-s1", "b/z-s1", "a/facts-y-s0", "a/facts-y-s1"]
