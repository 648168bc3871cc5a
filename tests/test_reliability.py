"""Nothing lost, nothing silently accepted (issue 22): run folders, interruption, typed overrides,
empty inputs, copying and pickling, and clear errors where a traceback used to be."""

import copy
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ultramem import PKMConfig, PKMLayer, UltraMemConfig, UltraMemLayer
from ultramem.cli import main
from ultramem.data import DataConfig, prepare_data
from ultramem.model import LanguageModel, LMConfig
from ultramem.runs import RunFolderError, RunLock, read_metrics
from ultramem.train import RunConfig, train

MODEL = {"dim": 32, "n_layers": 2, "n_heads": 2, "ffn": "ultramem", "memory_placement": "0:1",
         "memory": {"num_keys": 8, "key_dim": 16, "heads": 2, "topk": 4}}
DATA = {"num_people": 16, "vocab_size": 300, "fact_repetitions": 2}
QUIET = {"log": lambda *_: None}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    prepare_data(DataConfig(**DATA), d, log=None)
    return str(d)


def _cfg(out, cache_dir, **train_fields):
    t = {"out_dir": str(out), "cache_dir": cache_dir, "steps": 6, "batch_size": 4, "seq_len": 16,
         "warmup_steps": 1, "log_every": 1, "eval_every": 3, "fact_queries": 2, "fact_max_new_tokens": 2,
         "progress": False, "threads": 1, **train_fields}
    return RunConfig.from_dict({"model": MODEL, "data": DATA, "train": t})


# ---------------------------------------------------------------- 1. run folders


def test_training_into_a_run_folder_is_refused_without_resume_or_overwrite(tmp_path, cache_dir):
    out = tmp_path / "run"
    train(_cfg(out, cache_dir), **QUIET)
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(RunFolderError, match=r"already holds a run.*--resume.*--overwrite"):
        train(_cfg(out, cache_dir), **QUIET)
    assert (out / "metrics.jsonl").read_text() == before  # nothing was touched
    res = train(_cfg(out, cache_dir, overwrite=True, steps=2), **QUIET)
    assert res["step"] == 2 and read_metrics(out)[-1]["step"] == 2


def test_resume_without_a_checkpoint_is_an_error_not_a_fresh_start(tmp_path, cache_dir):
    with pytest.raises(RunFolderError, match="train.resume: .* has no checkpoint.safetensors"):
        train(_cfg(tmp_path / "empty", cache_dir, resume=True), **QUIET)
    res = train(_cfg(tmp_path / "auto", cache_dir, resume="auto", steps=2), **QUIET)  # auto: fresh
    assert res["step"] == 2


def test_damaged_last_metrics_line_and_stray_temp_files(tmp_path, cache_dir):
    out = tmp_path / "run"
    train(_cfg(out, cache_dir, stop_after=3), **QUIET)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 4, "loss": 1.')  # a kill in the middle of a write
    (out / ".checkpoint.safetensors.abc.tmp").write_bytes(b"half a save")
    with pytest.warns(RuntimeWarning, match="damaged last line"):
        res = train(_cfg(out, cache_dir, resume=True), **QUIET)
    assert res["step"] == 6 and not list(out.glob(".*.tmp"))
    assert [r["step"] for r in read_metrics(out) if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_a_damaged_line_in_the_middle_names_file_and_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1}\n{"step": 2,,}\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not valid JSON"):
        read_metrics(p)


def test_periodic_checkpoints_by_time(tmp_path, cache_dir, monkeypatch):
    clock = iter(range(0, 10_000, 400))  # each call 400 s later: every step is past 5 minutes
    monkeypatch.setattr("ultramem.train.time.monotonic", lambda: next(clock))
    saved = []
    monkeypatch.setattr("ultramem.train.save_checkpoint", lambda *a, **k: saved.append(k["step"]))
    train(_cfg(tmp_path / "run", cache_dir, ckpt_minutes=5.0, eval_every=0), **QUIET)
    assert saved == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_sigint_writes_a_checkpoint_and_exits_cleanly(tmp_path, cache_dir):
    out = tmp_path / "run"
    cfg = _cfg(out, cache_dir, steps=100_000, eval_every=0, log_every=1).to_dict()
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    args = [sys.executable, "-m", "ultramem.cli", "train", "--config", str(tmp_path / "cfg.json"),
            "--no-progress"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not read_metrics_safe(out):  # wait for the first logged step
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "checkpoint saved" in stdout + stderr
    step = json.loads(stdout[stdout.index("{"):])["step"]
    from ultramem.checkpoint import read_checkpoint_meta

    assert read_checkpoint_meta(out)["step"] == step >= 1  # nothing after the checkpoint was lost


def read_metrics_safe(out: Path) -> list:
    try:
        return [r for r in read_metrics(out) if r.get("kind") == "train"]
    except (OSError, ValueError):
        return []


# ---------------------------------------------------------------- 2. one process per folder


def test_a_second_training_in_the_same_folder_is_refused_with_the_holders_pid(tmp_path, cache_dir):
    out = tmp_path / "run"
    out.mkdir()
    with RunLock(out):  # as if another process were training there
        pid = os.getpid()
        with pytest.raises(RunFolderError, match=rf"in use by another training process \(PID {pid}\)"):
            train(_cfg(out, cache_dir), **QUIET)
    train(_cfg(out, cache_dir, steps=1), **QUIET)  # released: the folder is usable again


def test_a_dead_holders_lock_does_not_block(tmp_path, cache_dir):
    out = tmp_path / "run"
    out.mkdir()
    code = f"from ultramem.runs import RunLock; RunLock({str(out)!r}).__enter__(); import os; os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)  # dies holding it
    assert (out / ".lock").exists()
    assert train(_cfg(out, cache_dir, steps=1), **QUIET)["step"] == 1


# ---------------------------------------------------------------- 3. typed overrides


@pytest.mark.parametrize("sets, match", [
    (["model.memory.query_conv=no"], r"model.memory.query_conv: must be true/false/1/0 \(got 'no'\)"),
    (["train.resume=no"], r"train.resume: must be true/false/1/0 or one of \['auto'\] \(got 'no'\)"),
    (["model.memory.core_loss_coef=abc"], r"memory.core_loss_coef: must be a number >= 0 \(got 'abc'\)"),
    (["model.memory.core_loss_tau=-1"], r"model.memory.core_loss_tau: must be a number >= 0 \(got -1\)"),
    (["model.memory.core_loss_coef=NaN"], r"model.memory.core_loss_coef: must be a number >= 0 \(got nan\)"),
    (["data.vocab_size=\"abc\""], r"data.vocab_size: must be an int \(got 'abc'\)"),
])
def test_bad_overrides_name_field_rule_and_value(tmp_path, capsys, sets, match):
    args = ["train", "--preset", "tiny-ultramem", "--out", str(tmp_path / "r")]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and __import__("re").search(match, err), err


def test_booleans_take_true_false_1_0_only():
    base = {"dim": 16, "num_keys": 4, "key_dim": 8, "topk": 4}
    for spelled, want in (("true", True), ("0", False), (1, True), (False, False)):
        assert UltraMemConfig.from_dict({**base, "sparse_values": spelled}).sparse_values is want
    for bad in ("yes", "no", 2, "on"):
        with pytest.raises(ValueError, match="sparse_values: must be true/false/1/0"):
            UltraMemConfig.from_dict({**base, "sparse_values": bad})


def test_a_null_section_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"^model: must be a table of keys \(got None\)"):
        RunConfig.from_dict({"model": None})


# ---------------------------------------------------------------- 4. empty inputs


@pytest.mark.parametrize("shape", [(0, 3), (2, 0)])
def test_empty_batches_give_empty_outputs(shape):
    um = UltraMemLayer(UltraMemConfig(dim=16, num_keys=4, key_dim=8, value_dim=8, topk=4))
    pkm = PKMLayer(PKMConfig(dim=16, num_keys=4, key_dim=8, topk=2, heads=2))
    x = torch.randn(*shape, 16)
    assert um(x).shape == (*shape, 16) and pkm(x).shape == (*shape, 16)
    assert um.retrieve(x).indices.shape == (*shape, 2, 4)
    assert pkm.retrieve(x).scores.shape == (*shape, 2, 2, 1)
    lm = LanguageModel(LMConfig(vocab_size=30, dim=16, n_layers=2, n_heads=2, **{
        k: v for k, v in MODEL.items() if k in ("ffn", "memory_placement")}, memory=MODEL["memory"]))
    idx = torch.zeros(*shape, dtype=torch.long)
    logits, loss = lm(idx, idx)
    assert logits.shape == (*shape, 30) and torch.isnan(loss)


def test_generate_from_an_empty_prompt_is_a_clear_error():
    lm = LanguageModel(LMConfig(vocab_size=30, dim=16, n_layers=1, n_heads=2))
    with pytest.raises(ValueError, match="the prompt is empty"):
        lm.generate(torch.zeros(1, 0, dtype=torch.long), 3)


# ---------------------------------------------------------------- 5. copying and pickling


def test_layers_and_models_copy_and_pickle_after_inference():
    torch.manual_seed(0)
    layer = UltraMemLayer(UltraMemConfig(dim=16, num_keys=4, key_dim=8, value_dim=8, topk=4))
    x = torch.randn(1, 3, 16)
    with torch.inference_mode():
        layer(x)
    with torch.no_grad():
        want = layer(x)
    twin = copy.deepcopy(layer)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)  # our own bytes, just written: not untrusted
    for other in (twin, loaded):
        with torch.no_grad():
            assert torch.equal(other(x), want)
    lm = LanguageModel(LMConfig(vocab_size=30, dim=16, n_layers=2, n_heads=2, ffn="ultramem",
                                memory_placement="0:1", memory=MODEL["memory"] | {"query_conv": True}))
    out = lm.generate(torch.ones(1, 2, dtype=torch.long), 3, temperature=0)
    assert torch.equal(copy.deepcopy(lm).generate(torch.ones(1, 2, dtype=torch.long), 3, temperature=0), out)


# ---------------------------------------------------------------- 6. messages, not tracebacks


def test_generate_rejects_foreign_token_ids_and_nan_temperature():
    lm = LanguageModel(LMConfig(vocab_size=30, dim=16, n_layers=1, n_heads=2))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, vocab_size=30\) \(got 3..35\)"):
        lm.generate(torch.tensor([[3, 35]]), 2)
    with pytest.raises(ValueError, match="temperature: must be a finite number >= 0"):
        lm.generate(torch.tensor([[3]]), 2, temperature=float("nan"))


@pytest.mark.parametrize("where", ["under_a_file", "read_only"])
def test_unusable_out_dir_is_a_message(tmp_path, capsys, where):
    if where == "under_a_file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "run"
    else:
        if os.geteuid() == 0:
            out = Path("/proc/ultramem-run")  # root may write anywhere a mode allows; /proc refuses all
        else:
            (tmp_path / "ro").mkdir(mode=0o500)
            out = tmp_path / "ro" / "run"
    assert main(["train", "--preset", "tiny-dense", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"cannot write to '{out}'" in err


def test_half_precision_input_to_an_fp32_layer_runs_in_the_layer_dtype():
    torch.manual_seed(1)
    layer = UltraMemLayer(UltraMemConfig(dim=16, num_keys=4, key_dim=8, value_dim=8, topk=4))
    x = torch.randn(1, 3, 16).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x.float()), rtol=0.02, atol=0.02)
    pkm = PKMLayer(PKMConfig(dim=16, num_keys=4, key_dim=8, topk=2, heads=2, query_norm="layer"))
    assert pkm(x.half()).dtype == torch.float16


def test_device_cuda_without_cuda_is_a_message(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["generate", str(tmp_path), "--prompt", "x", "--device", "cuda"]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err


# ---------------------------------------------------------------- 7. read-count statistics


def test_read_count_statistics_survive_a_resume(tmp_path, cache_dir):
    full = train(_cfg(tmp_path / "a", cache_dir, eval_every=4, steps=8), **QUIET)
    train(_cfg(tmp_path / "b", cache_dir, eval_every=4, steps=8, stop_after=6), **QUIET)
    resumed = train(_cfg(tmp_path / "b", cache_dir, eval_every=4, steps=8, resume=True), **QUIET)
    assert full["mem0_top10pct_reads"] == resumed["mem0_top10pct_reads"]
    assert full["mem0_rows_read_train"] == resumed["mem0_rows_read_train"]
