import json

import pytest
import torch

from ultramem.checkpoint import CheckpointError
from ultramem.data import DataConfig, prepare_data
from ultramem.train import RunConfig, TrainConfig, evaluate, load_run, read_metrics, train

MODELS = {
    "ultramem": {"dim": 32, "n_layers": 2, "n_heads": 2, "ffn": "ultramem", "memory_placement": "0:1",
                 "memory": {"num_keys": 8, "key_dim": 16, "heads": 2, "topk": 4, "sparse_values": True}},
    "moe": {"dim": 32, "n_layers": 2, "n_heads": 2, "ffn": "moe", "moe_experts": 4, "moe_topk": 2,
            "moe_hidden": 32},
    "dense": {"dim": 32, "n_layers": 1, "n_heads": 2, "ffn_hidden": 64},
}
DATA = {"num_people": 16, "vocab_size": 300, "fact_repetitions": 2}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    prepare_data(DataConfig(**DATA), d, log=None)
    return str(d)


def _cfg(tmp_path, cache_dir, model="dense", **train):
    t = {"out_dir": str(tmp_path / "run"), "cache_dir": cache_dir, "steps": 8, "batch_size": 4, "seq_len": 16,
         "warmup_steps": 2, "log_every": 1, "eval_every": 0, "fact_queries": 4, "fact_max_new_tokens": 4,
         "progress": False, "threads": 1, **train}
    return RunConfig.from_dict({"model": MODELS[model], "data": DATA, "train": t})


def _losses(out_dir):
    return [x for r in read_metrics(out_dir) if r["kind"] == "train" for x in r["losses"]]


@pytest.mark.parametrize("model", ["ultramem", "moe"])
def test_resume_reproduces_uninterrupted_losses_bitwise(tmp_path, cache_dir, model):
    # dropout makes the global RNG matter, so its restoration is tested too
    straight = _cfg(tmp_path / "a", cache_dir, model, eval_every=3)
    straight.model = straight.model.replace(dropout=0.1)
    full = train(straight, log=lambda *_: None)

    halves = _cfg(tmp_path / "b", cache_dir, model, eval_every=3, stop_after=4)
    halves.model = halves.model.replace(dropout=0.1)
    first = train(halves, log=lambda *_: None)
    assert first["step"] == 4 and [s for s, _ in first["losses"]] == [1, 2, 3, 4]
    halves.train.stop_after, halves.train.resume = None, True
    second = train(halves, log=lambda *_: None)

    assert [s for s, _ in second["losses"]] == [5, 6, 7, 8]
    assert [v for _, v in first["losses"] + second["losses"]] == [v for _, v in full["losses"]]
    assert _losses(tmp_path / "a" / "run") == _losses(tmp_path / "b" / "run")  # log rebuilt seamlessly
    assert second["val_loss"] == full["val_loss"]
    a, _, _, _ = load_run(tmp_path / "a" / "run")
    b, _, _, _ = load_run(tmp_path / "b" / "run")
    for (n, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), n


def test_training_lowers_loss_and_logs(tmp_path, cache_dir):
    cfg = _cfg(tmp_path, cache_dir, "dense", steps=30, lr=1e-2, log_every=5, eval_every=15)
    res = train(cfg, log=lambda *_: None)
    losses = [v for _, v in res["losses"]]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    recs = read_metrics(cfg.train.out_dir)
    assert recs[0]["kind"] == "params" and recs[0]["total"] == res["params"]["total"] > 0
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [15, 30]
    assert 0.0 <= evals[-1]["fact_acc"] <= 1.0 and evals[-1]["val_loss"] > 0
    assert all(r["tokens_per_s"] > 0 for r in recs if r["kind"] == "train")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["vocab_size"] == 300 and saved["train"]["steps"] == 30


def test_aux_losses_are_logged_separately(tmp_path, cache_dir):
    cfg = _cfg(tmp_path, cache_dir, "moe", steps=2)
    train(cfg, log=lambda *_: None)
    rec = [r for r in read_metrics(cfg.train.out_dir) if r["kind"] == "train"][-1]
    assert rec["aux_moe_balance"] > 0
    assert rec["loss"] == pytest.approx(rec["ce"] + rec["aux_moe_balance"], rel=1e-5)


def test_bf16_autocast_on_cpu_trains(tmp_path, cache_dir):
    bf16 = train(_cfg(tmp_path / "bf16", cache_dir, "ultramem", steps=3, dtype="bf16"), log=lambda *_: None)
    fp32 = train(_cfg(tmp_path / "fp32", cache_dir, "ultramem", steps=3, dtype="fp32"), log=lambda *_: None)
    losses = [v for _, v in bf16["losses"]]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(v)) for v in losses)
    # the same run in fp32 (same seed, same batches): bf16 rounding moves the losses only a little
    for (s1, a), (s2, b) in zip(bf16["losses"], fp32["losses"], strict=True):
        assert s1 == s2 and abs(a - b) < 0.05 * b, (s1, a, b)
    assert bf16["losses"] != fp32["losses"]  # autocast really ran in bf16


def test_load_run_rebuilds_the_trained_model(tmp_path, cache_dir):
    cfg = _cfg(tmp_path, cache_dir, "ultramem", steps=3)
    res = train(cfg, log=lambda *_: None)
    model, run_cfg, tok, ckpt = load_run(cfg.train.out_dir)
    assert ckpt.step == 3 and tok is not None and tok.vocab_size == 300
    data = prepare_data(DataConfig(**DATA), cache_dir, log=None)
    again = evaluate(model, data, TrainConfig(**run_cfg["train"]), torch.autocast("cpu", enabled=False))
    assert again["val_loss"] == res["val_loss"]


def test_resume_with_other_model_config_names_the_field(tmp_path, cache_dir):
    train(_cfg(tmp_path, cache_dir, "dense", steps=2), log=lambda *_: None)
    other = _cfg(tmp_path, cache_dir, "dense", steps=4, resume=True)
    other.model = other.model.replace(ffn_hidden=96)
    with pytest.raises(CheckpointError, match="checkpoint.safetensors.*ffn_hidden: checkpoint has 64"):
        train(other, log=lambda *_: None)


@pytest.mark.parametrize("bad, match", [
    ({"train": {"steps": 0}}, r"train.steps: must be a positive int \(got 0\)"),
    ({"train": {"dtype": "fp16"}}, r"train.dtype: must be one of \['auto', 'fp32', 'bf16'\]"),
    ({"train": {"warmup_steps": 50, "steps": 10}}, "train.warmup_steps: must be <= steps=10"),
    ({"train": {"stepz": 3}}, r"train: unknown key\(s\) \['stepz'\]; allowed keys are \[.*'steps'"),
    ({"trian": {}}, r"unknown section\(s\) \['trian'\]"),
    ({"model": {"ffn": "mlp"}}, "ffn: must be one of"),
    ({"data": {"source": "web"}}, "source: must be one of"),
])
def test_config_errors_name_key_and_rule(bad, match):
    with pytest.raises(ValueError, match=match):
        RunConfig.from_dict(bad)


def test_crash_after_periodic_checkpoint_resumes_exactly(tmp_path, cache_dir, monkeypatch):
    import ultramem.train as train_mod

    common = dict(steps=8, ckpt_every=5, log_every=4, eval_every=6, fact_queries=0)
    full = train(_cfg(tmp_path / "a", cache_dir, "dense", **common), log=lambda *_: None)

    def crash(*a, **k):
        raise KeyboardInterrupt  # dies in step 6's eval, after the step-5 checkpoint

    with monkeypatch.context() as mp:
        mp.setattr(train_mod, "evaluate", crash)
        with pytest.raises(KeyboardInterrupt):
            train(_cfg(tmp_path / "b", cache_dir, "dense", **common), log=lambda *_: None)
    second = train(_cfg(tmp_path / "b", cache_dir, "dense", **common, resume=True), log=lambda *_: None)
    assert second["losses"] == [(s, v) for s, v in full["losses"] if s > 5]
    runs = [read_metrics(tmp_path / d / "run") for d in "ab"]
    assert [(r["kind"], r["step"]) for r in runs[0]] == [(r["kind"], r["step"]) for r in runs[1]]
    assert _losses(tmp_path / "a" / "run") == _losses(tmp_path / "b" / "run")

    notes = []  # resuming a finished run with other settings: reported, then it only evaluates
    again = train(_cfg(tmp_path / "b", cache_dir, "dense", **common, resume=True, lr=0.002), log=notes.append)
    assert again["losses"] == [] and again["val_loss"] == full["val_loss"]
    assert any("train.lr: checkpoint has 0.003, this run has 0.002" in n for n in notes)


def test_training_reads_are_counted_per_eval_interval(tmp_path, cache_dir):
    # 2 evals of 3 steps; each step reads 4*16 tokens x 2 heads x 4 slots = 512 rows of 64.
    cfg = _cfg(tmp_path, cache_dir, "ultramem", steps=6, eval_every=3)
    train(cfg, log=lambda *_: None)
    evals = [r for r in read_metrics(cfg.train.out_dir) if r["kind"] == "eval"]
    assert len(evals) == 2
    for r in evals:
        assert 0 < r["mem0_rows_read_train"] <= 1
        assert 0.1 <= r["mem0_top10pct_reads"] <= 1  # the top 10% of rows take >= 10% of reads
    off = _cfg(tmp_path / "off", cache_dir, "ultramem", steps=3, eval_every=3, memory_diagnostics=False)
    train(off, log=lambda *_: None)
    first_eval = [r for r in read_metrics(off.train.out_dir) if r["kind"] == "eval"][0]
    assert "mem0_rows_read_train" not in first_eval
