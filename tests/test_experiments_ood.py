"""`ultramem exp ood`: a suite's finished text runs scored on another text and on their own val
text with the same function and cap; runs without a checkpoint are skipped; the report tables it."""

import json
from pathlib import Path

import pytest

from ultramem.cli import main
from ultramem.data.sources import read_text_documents
from ultramem.eval import text_loss
from ultramem.experiments import ood, report, runner
from ultramem.runs import load_run

TEXT = Path(__file__).parent / "fixtures" / "text"
TRAIN = {"steps": 3, "batch_size": 2, "seq_len": 16, "warmup_steps": 1, "eval_every": 0, "log_every": 1,
         "ckpt_every": 3, "threads": 1, "progress": False}


def _write(root: Path, group: str, seed: int, steps: int = 3) -> Path:
    data = {"source": "text", "train_path": str(TEXT / "train"), "val_path": str(TEXT / "val"),
            "vocab_size": 300}
    cfg = {"name": f"{group}-s{seed}", "group": group, "seed": seed, "data": data,
           "model": {"dim": 16, "n_layers": 1, "n_heads": 2, "ffn": "dense", "ffn_hidden": 16 * seed + 32},
           "train": {**TRAIN, "seed": seed, "steps": steps}}
    path = root / "configs" / "tiny" / f"{group}-s{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))
    return path


def test_ood_scores_each_finished_run_on_both_texts(tmp_path):
    for group, seed in (("dense", 0), ("dense", 1), ("wide", 0)):
        runner.run_one(tmp_path, "tiny", _write(tmp_path, group, seed))
    # e.g. results copied from another machine without the run folders
    (tmp_path / "runs" / "tiny" / "wide-s0" / "checkpoint.safetensors").unlink()
    other = str(TEXT / "train" / "river.txt")
    logged = []
    written = ood.evaluate_suite(tmp_path, "tiny", other, "river", max_tokens=100, log=logged.append)
    assert sorted(p.name for p in written) == ["dense-s0.json", "dense-s1.json"]
    assert any("skip wide-s0: no checkpoint" in line for line in logged)
    again = []  # a second call finds both scored and scores nothing
    assert ood.evaluate_suite(tmp_path, "tiny", other, "river", max_tokens=100, log=again.append) == []
    assert sum("already scored" in line for line in again) == 2
    rec = json.loads(written[0].read_text())
    # The same numbers as scoring the loaded checkpoint directly, each text with the same cap.
    model, _, tok, _ = load_run(str(tmp_path / "runs" / "tiny" / "dense-s0"))
    for key, path in (("ood", other), ("val", str(TEXT / "val"))):
        direct = text_loss(model, tok, read_text_documents(path, "x"), 16, 2, 100)
        assert rec[key]["tokens"] == direct["tokens"] == 100
        assert rec[key]["bits_per_byte"] == pytest.approx(direct["bits_per_byte"], rel=1e-6)
    assert rec["ood"]["bits_per_byte"] != rec["val"]["bits_per_byte"]
    # The suite's result loader never mistakes OOD records for runs; the report tables them.
    assert sorted(report.load_results(tmp_path, "tiny")) == ["dense", "wide"]
    text = "\n".join(ood.ood_sections(tmp_path, "tiny"))
    assert "Out-of-domain text `river`" in text and "| dense | 2 |" in text


def test_a_run_stopped_early_is_not_scored(tmp_path):
    cfg = _write(tmp_path, "dense", 0, steps=3)
    spec = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**spec, "train": {**spec["train"], "stop_after": 2}}))
    runner.run_one(tmp_path, "tiny", cfg)
    logged = []
    assert ood.evaluate_suite(tmp_path, "tiny", str(TEXT / "val"), "v", log=logged.append) == []
    assert "finished at step 2, not its last" in logged[0]


def _rec(group, seed, val, bpb):
    return {"group": group, "seed": seed, "data": "x", "max_tokens": 10,
            "val": {"bits_per_byte": val}, "ood": {"bits_per_byte": bpb}}


def test_table_compares_with_dense_and_judges_noise():
    groups = {"um": [_rec("um", 0, 1.0, 2.0), _rec("um", 1, 1.1, 2.1)],
              "dense": [_rec("dense", 0, 1.2, 2.5), _rec("dense", 1, 1.2, 2.6)],
              "moe": [_rec("moe", 0, 1.2, 2.45), _rec("moe", 1, 1.2, 2.7)]}
    rows = ood.ood_table(groups, "t").splitlines()
    assert rows[2].startswith("| dense | 2 | 1.2000 ± 0.0000 | 2.5500 ± 0.0500 | - | - |")
    assert "| moe |" in rows[3] and "+0.0250" in rows[3] and "no (ranges overlap)" in rows[3]
    assert "| um |" in rows[4] and "-0.5000" in rows[4] and "yes (ranges disjoint)" in rows[4]
    assert rows[4].endswith("| 1.0000 ± 0.0000 |")  # the OOD - val gap, mean over seeds


def test_cli_errors_name_the_option(tmp_path, capsys):
    assert main(["exp", "ood", "main", "--root", str(tmp_path)]) == 2
    assert "--data: required by ood" in capsys.readouterr().err
    assert main(["exp", "ood", "main", "--root", str(tmp_path), "--data", "x", "--max-tokens", "0"]) == 2
    assert "--max-tokens: must be a positive int (got 0)" in capsys.readouterr().err
    assert main(["exp", "ood", "main", "--root", str(tmp_path), "--data", "x", "--tag", "a/b"]) == 2
    assert "--tag: letters, digits" in capsys.readouterr().err
