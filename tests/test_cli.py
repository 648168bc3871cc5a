import json
import re

import pytest

from ultramem.cli import apply_set, assemble_config, main
from ultramem.counting import count_params
from ultramem.model import LanguageModel, LMConfig
from ultramem.presets import MODELS, PRESETS, get_preset

TINY = ["--set", "model.dim=32", "--set", "model.n_heads=2",
        "--set", "data.num_people=12", "--set", "data.vocab_size=300", "--set", "data.fact_repetitions=2",
        "--set", "train.steps=3", "--set", "train.warmup_steps=1", "--set", "train.batch_size=2",
        "--set", "train.seq_len=16", "--set", "train.fact_queries=3", "--set", "train.eval_windows=2",
        "--set", "train.threads=1", "--no-progress"]


def _tiny(tmp_path, extra=()):
    return TINY + ["--set", f"train.cache_dir={tmp_path / 'cache'}", *extra]


def test_presets_are_matched():
    counts = {k: count_params(LanguageModel(LMConfig.from_dict({**MODELS[k], "vocab_size": 512})))
              for k in MODELS}
    act = counts["dense"]["activated"]
    for k, c in counts.items():
        assert abs(c["activated"] - act) / act < 0.01, (k, c["activated"], act)
    tot = counts["moe"]["total"]
    for k in ("ultramem", "pkm"):
        assert abs(counts[k]["total"] - tot) / tot < 0.01, (k, counts[k]["total"], tot)
    assert counts["moe"]["total"] > 2 * counts["dense"]["total"]  # the sparse models really are bigger
    assert set(PRESETS) == {f"tiny-{k}" for k in MODELS}


def test_set_parsing_and_merge_order(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"train": {"lr": 0.5, "steps": 7}, "model": {"memory": {"topk": 4}}}))
    sets = ["train.lr=1e-3", "model.memory.heads=1", "model.memory_placement=0:1/2:3",
            'data.fact_attributes=["field"]']
    d = assemble_config("tiny-ultramem", str(cfg), sets)
    assert d["train"]["lr"] == 1e-3 and d["train"]["steps"] == 7  # --set beats file beats preset
    assert d["model"]["memory"] == {**MODELS["ultramem"]["memory"], "topk": 4, "heads": 1}
    assert d["model"]["memory_placement"] == "0:1/2:3" and d["data"]["fact_attributes"] == ["field"]
    toml = tmp_path / "c.toml"
    toml.write_text('[train]\nsteps = 9\n[model]\ndim = 48\n')
    assert assemble_config(None, str(toml))["train"]["steps"] == 9


def test_runner_configs_train_as_written(tmp_path):
    from ultramem.experiments.suites import main_suite
    from ultramem.train import RunConfig

    spec = next(r for r in main_suite() if r["seed"] == 1)
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(spec))
    d = assemble_config(None, str(cfg), ["train.steps=100"])
    assert set(d) == {"model", "data", "train"}  # name/group/seed dropped, nothing else
    assert d["model"] == spec["model"] and d["data"] == spec["data"]
    assert d["train"] == {**spec["train"], "steps": 100} and d["train"]["seed"] == 1
    RunConfig.from_dict(d)  # and it validates as a run config
    # a top-level seed alone becomes the training seed
    cfg.write_text(json.dumps({"name": "x", "seed": 4, "train": {"steps": 2}}))
    assert assemble_config(None, str(cfg))["train"] == {"steps": 2, "seed": 4}
    cfg.write_text(json.dumps({"seed": 3, "train": {"seed": 0}}))
    with pytest.raises(ValueError, match=r"has seed 3 but train.seed 0"):
        assemble_config(None, str(cfg))


@pytest.mark.parametrize("assignment, match", [
    ("steps=3", "expected section.key=value"),
    ("trian.steps=3", r"unknown section 'trian'; allowed are \['model', 'data', 'train'\]"),
    ("train.steps", "expected section.key=value"),
])
def test_bad_set_is_rejected(assignment, match):
    with pytest.raises(ValueError, match=match):
        apply_set({}, assignment)


def test_unknown_preset_lists_names():
    with pytest.raises(ValueError, match=r"preset: unknown name 'tiny-x'; allowed are \['tiny-dense'"):
        get_preset("tiny-x")


@pytest.mark.parametrize("sets, match", [
    (["train.dtype=fp16"], r"train.dtype: must be one of \['auto', 'fp32', 'bf16'\] \(got 'fp16'\)"),
    (["train.stepz=3"], r"train: unknown key\(s\) \['stepz'\]"),
    (["model.ffn=mlp"], r"model.ffn: must be one of \['dense', 'moe', 'pkm', 'ultramem'"),
    (["model.memory.topk=0"], "topk: must be a positive int"),
])
def test_config_errors_exit_2_with_the_key(tmp_path, capsys, sets, match):
    args = ["train", "--preset", "tiny-ultramem", "--out", str(tmp_path / "r")]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ultramem train: error:")
    assert re.search(match, err), err


def test_train_eval_generate_plot_smoke(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny-ultramem", "--out", str(run), *_tiny(tmp_path)]) == 0
    assert (run / "checkpoint.safetensors").is_file() and (run / "tokenizer.json").is_file()
    summary = json.loads(capsys.readouterr().out.split("\n{\n", 1)[1].join(["{\n", ""]))
    assert summary["step"] == 3 and summary["val_loss"] > 0

    assert main(["eval", str(run), "--fact-queries", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 3 and out["val_loss"] > 0 and 0 <= out["fact_acc"] <= 1

    assert main(["generate", str(run), "--prompt", "Alma", "--max-new-tokens", "5", "--top-k", "5"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Alma")
    assert main(["generate", str(run), "--prompt", "Alma", "--max-new-tokens", "5000"]) == 2
    assert "max_new_tokens" in capsys.readouterr().err

    png = tmp_path / "p.png"
    assert main(["plot", str(run), str(run), "--out", str(png), "--metrics", "loss,val_loss"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(run), "--metrics", "bogus"]) == 2


def test_eval_of_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny-dense", "--out", str(run), *_tiny(tmp_path)]) == 0
    ck = run / "checkpoint.safetensors"
    ck.write_bytes(ck.read_bytes()[:100])
    capsys.readouterr()
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.safetensors" in err and "corrupt or truncated" in err


def test_compare_prints_table_and_plot(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--out", str(out), "--kinds", "dense,ultramem", *_tiny(tmp_path)]
    assert main(args) == 0
    text = capsys.readouterr().out
    lines = [ln.split("|")[1:-1] for ln in text.splitlines() if ln.startswith("|") and "---" not in ln]
    assert [c.strip() for c in lines[0]][:4] == ["model", "total params", "activated", "val loss"]
    assert [r[0].strip() for r in lines[1:]] == ["dense", "ultramem"]
    assert (out / "loss.png").is_file() and f"loss curves saved to {out / 'loss.png'}" in text
    rows = json.loads((out / "summary.json").read_text())
    assert [r["kind"] for r in rows] == ["dense", "ultramem"] and all(r["val_loss"][0] > 0 for r in rows)
    assert main(["compare", "--kinds", "dense,mlp"]) == 2


def test_bench_is_discoverable(capsys):
    assert main(["bench", "nope"]) == 2
    assert "optim" in capsys.readouterr().err


def test_compare_twice_into_one_folder_replaces_its_runs(tmp_path, capsys):
    args = ["compare", "--kinds", "dense", "--steps", "2", "--out", str(tmp_path / "cmp"), "--no-progress",
            "--set", "train.eval_every=0", "--set", "train.fact_queries=2",
            "--set", f"train.cache_dir={tmp_path / 'cache'}"]
    assert main(args) == 0
    assert main(args) == 0  # the main job can be rerun: compare's folder holds its own runs
    assert "total time" in capsys.readouterr().out


def test_compare_people_sets_the_corpus_and_a_set_wins(tmp_path, capsys):
    """--people sizes the main job's fact corpus (default presets.COMPARE_PEOPLE); an explicit
    --set data.num_people wins over it; a non-positive count is refused."""
    from ultramem.presets import COMPARE_PEOPLE, DATA

    base = ["compare", "--kinds", "dense", "--steps", "2", "--no-progress", "--set", "train.eval_every=0",
            "--set", "train.fact_queries=2", "--set", f"train.cache_dir={tmp_path / 'cache'}"]

    def people(out, *extra):
        assert main([*base, "--out", str(tmp_path / out), *extra]) == 0
        return json.loads((tmp_path / out / "dense" / "config.json").read_text())["data"]["num_people"]

    assert COMPARE_PEOPLE > DATA["num_people"]  # the main job is in the capacity regime
    assert people("a") == COMPARE_PEOPLE
    assert people("b", "--people", "7") == 7
    assert people("c", "--people", "7", "--set", "data.num_people=9") == 9
    assert main([*base, "--out", str(tmp_path / "d"), "--people", "0"]) == 2
    assert "--people: must be >= 1 (got 0)" in capsys.readouterr().err
