"""Tests for ultramem.data.sources: text folders/globs, the document split, and the HF source offline."""

import json
import sys
from pathlib import Path

import pytest

from ultramem.data import DataConfig, load_documents, prepare_data, split_documents
from ultramem.data.sources import resolve_text_files, source_fingerprint

FIXTURES = Path(__file__).parent / "fixtures" / "text"


def test_folder_glob_and_file_resolve_to_sorted_files():
    folder = resolve_text_files(str(FIXTURES / "train"), "train_path")
    assert [f.name for f in folder] == sorted(f.name for f in folder) and len(folder) == 6
    assert resolve_text_files(str(FIXTURES / "*" / "*.txt"), "train_path") == sorted(
        folder + resolve_text_files(str(FIXTURES / "val"), "val_path")
    )
    one = FIXTURES / "train" / "river.txt"
    assert resolve_text_files(str(one), "train_path") == [one]


def test_split_by_document_is_deterministic_and_disjoint():
    docs = [f"document {i}" for i in range(40)]
    train, val = split_documents(docs, 0.1)
    assert len(val) == 4 and len(train) == 36 and set(train).isdisjoint(val)
    assert split_documents(docs, 0.1) == (train, val)
    # evenly spread over the corpus, not just its tail
    positions = [docs.index(v) for v in val]
    assert positions[0] < 10 and positions[-1] >= 30
    train2, val2 = split_documents(docs[:2], 0.01)  # a tiny fraction still gives val one document
    assert len(train2) == len(val2) == 1 and set(train2 + val2) == set(docs[:2])


def test_text_source_without_val_path_splits(tmp_path):
    cfg = DataConfig(source="text", train_path=str(FIXTURES / "train"), val_fraction=0.34, vocab_size=300)
    docs = load_documents(cfg)
    assert len(docs.train) == 4 and len(docs.val) == 2
    all_docs = {p.read_text() for p in (FIXTURES / "train").glob("*.txt")}
    assert set(docs.train) | set(docs.val) == all_docs
    data = prepare_data(cfg, tmp_path, log=None)
    assert data.meta["num_train_docs"] == 4 and data.meta["num_val_docs"] == 2


def test_max_docs_caps_and_changes_fingerprint():
    full = DataConfig(source="text", train_path=str(FIXTURES / "train"), val_path=str(FIXTURES / "val"))
    capped = DataConfig(source="text", train_path=str(FIXTURES / "train"), val_path=str(FIXTURES / "val"),
                        max_docs=2)
    assert len(load_documents(capped).train) == 2
    assert source_fingerprint(full) != source_fingerprint(capped)


def test_fact_fields_do_not_key_a_text_source():
    a = DataConfig(source="text", train_path=str(FIXTURES / "train"), num_people=10)
    b = DataConfig(source="text", train_path=str(FIXTURES / "train"), num_people=20)
    assert source_fingerprint(a) == source_fingerprint(b)


# ------------------------------------------------------------------------------------------ hf
def _jsonl(path, texts, column="text"):
    path.write_text("".join(json.dumps({column: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def _texts():
    return [p.read_text() for p in sorted((FIXTURES / "train").glob("*.txt"))]


def test_hf_source_from_local_json(tmp_path):
    pytest.importorskip("datasets")
    train = _jsonl(tmp_path / "train.jsonl", _texts())
    val = _jsonl(tmp_path / "val.jsonl", ["A short validation document.", "And another one."])
    cfg = DataConfig(source="hf", hf_name="json", hf_data_files={"train": str(train), "validation": str(val)},
                     hf_val_split="validation", hf_cache_dir=str(tmp_path / "hf"), vocab_size=300)
    data = prepare_data(cfg, tmp_path / "cache", log=None)
    assert data.meta["num_train_docs"] == 6 and data.meta["num_val_docs"] == 2
    decoded = data.tokenizer.decode(data.train.tolist()).split("<|endoftext|>")[1:]
    assert decoded == _texts()
    assert data.tokenizer.decode(data.val.tolist()) == (
        "<|endoftext|>A short validation document.<|endoftext|>And another one."
    )


def test_hf_source_split_by_document_and_column_errors(tmp_path):
    pytest.importorskip("datasets")
    path = _jsonl(tmp_path / "all.jsonl", _texts(), column="body")
    base = dict(source="hf", hf_name="json", hf_data_files=str(path), hf_cache_dir=str(tmp_path / "hf"))
    docs = load_documents(DataConfig(**base, hf_text_column="body", val_fraction=0.2, max_docs=5))
    assert len(docs.train) == 4 and len(docs.val) == 1
    with pytest.raises(ValueError, match=r"hf_text_column: 'text' is not a column .*\['body', 'id'\]"):
        load_documents(DataConfig(**base))
    with pytest.raises(ValueError, match=r"hf_text_column: 'id' must hold str"):
        load_documents(DataConfig(**base, hf_text_column="id"))
    with pytest.raises(ValueError, match=r"hf_name: could not load dataset 'json'"):
        load_documents(DataConfig(**{**base, "hf_data_files": str(tmp_path / "nothing-*.jsonl")}))


def test_hf_source_streaming(tmp_path):
    pytest.importorskip("datasets")
    path = _jsonl(tmp_path / "all.jsonl", _texts())
    cfg = DataConfig(source="hf", hf_name="json", hf_data_files=str(path), hf_streaming=True, max_docs=3,
                     hf_cache_dir=str(tmp_path / "hf"))
    docs = load_documents(cfg)
    assert len(docs.train) + len(docs.val) == 3 and docs.train[0] == _texts()[0]


def test_hf_source_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match=r"needs the optional `datasets` package"):
        load_documents(DataConfig(source="hf", hf_name="json", hf_data_files="x.jsonl"))
