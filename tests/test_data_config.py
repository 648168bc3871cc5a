"""Tests for ultramem.data.config: every bad configuration gives a ValueError naming field, rule, value."""

from pathlib import Path

import pytest

from ultramem.data import DataConfig, prepare_data

FIXTURES = Path(__file__).parent / "fixtures" / "text"


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(source="csv"), r"data.source: must be one of \['facts', 'text', 'hf'\] \(got 'csv'\)"),
        (dict(vocab_size=100), r"vocab_size: must be >= 258 .*got 100"),
        (dict(val_fraction=1.5), r"data.val_fraction: must be a number > 0 and < 1 \(got 1.5\)"),
        (dict(max_docs=0), r"data.max_docs: must be a positive int, or null for the default \(got 0\)"),
        (dict(tokenizer_train_chars=0), r"data.tokenizer_train_chars: must be a positive int \(got 0\)"),
        (dict(source="text"), r"train_path: required for source 'text'.*got None"),
        (dict(source="hf"), r"hf_name: required for source 'hf'; got None"),
        (dict(source="hf", hf_name="x", hf_streaming=True), r"max_docs: required when hf_streaming"),
        (dict(num_people=10**6), r"num_people: must be in \[1, 36864\].*got 1000000"),
        (dict(fact_attributes=["birth_city", "birth_city"]), r"fact_attributes: must not repeat"),
        (dict(fact_attributes=[]), r"fact_attributes: must name some of"),
        (dict(fact_train_templates=0), r"fact_train_templates: must be >= 1; got 0"),
        (dict(fact_heldout_templates=-1), r"fact_heldout_templates: must be >= 0; got -1"),
        (dict(vocab_size="1024"), r"data.vocab_size: must be an int \(got '1024'\)"),
        (dict(num_people=2.5), r"data.num_people: must be an int \(got 2.5\)"),
        (dict(hf_streaming="yes"), r"data.hf_streaming: must be true/false/1/0 \(got 'yes'\)"),
    ],
)
def test_static_rules(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        DataConfig(**kwargs)


def test_valid_defaults_and_lists_from_config_files():
    cfg = DataConfig.from_dict({"source": "facts", "fact_attributes": ["birth_city", "employer"]})
    assert cfg.fact_attributes == ("birth_city", "employer")
    assert cfg.fact_config().attributes == ("birth_city", "employer")
    with pytest.raises(ValueError, match=r"data: unknown key\(s\) \['num_persons'\]; allowed keys"):
        DataConfig.from_dict({"num_persons": 3})


def test_file_system_rules_at_prepare_time(tmp_path):
    def fails(pattern, **kw):
        with pytest.raises(ValueError, match=pattern):
            prepare_data(DataConfig(source="text", vocab_size=300, **kw), tmp_path / "cache", log=None)

    fails(r"train_path: must be an existing folder, file or glob pattern; got '.*nowhere'",
          train_path=str(tmp_path / "nowhere"))
    (tmp_path / "no_txt").mkdir()
    (tmp_path / "no_txt" / "notes.md").write_text("not a .txt file")
    fails(r"train_path: no .txt files in folder", train_path=str(tmp_path / "no_txt"))
    fails(r"train_path: no files match glob", train_path=str(tmp_path / "*.nothing"))
    (tmp_path / "empty").mkdir()
    for i in range(3):
        (tmp_path / "empty" / f"{i}.txt").write_text("  \n" if i else "")
    fails(r"train_path: corpus is empty \(3 documents", train_path=str(tmp_path / "empty"))
    fails(r"val_path: corpus is empty", train_path=str(FIXTURES / "train"), val_path=str(tmp_path / "empty"))
    fails(r"val_path: not given, and a val split by document needs >= 2 documents; got 1",
          train_path=str(FIXTURES / "train" / "river.txt"))
    (tmp_path / "latin1").mkdir()
    (tmp_path / "latin1" / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    fails(r"train_path: file '.*a.txt' is not valid UTF-8", train_path=str(tmp_path / "latin1"))
    fails(r"tokenizer_path: file not found", train_path=str(FIXTURES / "train"),
          tokenizer_path=str(tmp_path / "missing.json"))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing half-built
