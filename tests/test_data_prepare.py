"""Tests for ultramem.data.prepare: token files, the cache (reuse, invalidation, repair) and facts."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import ultramem.data.facts as facts_mod
import ultramem.data.prepare as prepare_mod
from ultramem.data import DataConfig, Tokenizer, build_fact_corpus, prepare_data
from ultramem.data.prepare import _pieces, load_prepared, token_dtype

FIXTURES = Path(__file__).parent / "fixtures" / "text"


def _text_cfg(root=FIXTURES, **kw):
    kw = {"vocab_size": 300, **kw}
    return DataConfig(source="text", train_path=str(root / "train"), val_path=str(root / "val"), **kw)


def _count_builds(monkeypatch):
    calls = []
    real = prepare_mod._build
    monkeypatch.setattr(prepare_mod, "_build", lambda *a: calls.append(1) or real(*a))
    return calls


def test_text_source_token_files(tmp_path):
    data = prepare_data(_text_cfg(), tmp_path, log=None)
    tok = data.tokenizer
    assert data.train.dtype == np.uint16 and isinstance(data.train, np.memmap)
    assert (data.path / "tokenizer.json").is_file() and (data.path / "meta.json").is_file()
    assert data.meta["num_train_tokens"] == len(data.train) and data.meta["num_val_tokens"] == len(data.val)
    assert data.meta["num_train_docs"] == 6 and data.meta["num_val_docs"] == 2
    # every document is preceded by <|endoftext|> and decodes back to the file text
    assert int((data.train == tok.eos_id).sum()) == 6 and data.train[0] == tok.eos_id
    docs = tok.decode(data.train.tolist()).split("<|endoftext|>")[1:]
    expected = [p.read_text() for p in sorted((FIXTURES / "train").glob("*.txt"))]
    assert docs == expected
    assert tok.decode(data.val.tolist()).count("stationmaster") == 1
    meta = json.loads((data.path / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.vocab_size == data.vocab_size


def test_cache_is_reused_and_invalidated_by_content(tmp_path, monkeypatch):
    root = tmp_path / "corpus"
    shutil.copytree(FIXTURES, root)
    builds = _count_builds(monkeypatch)
    a = prepare_data(_text_cfg(root), tmp_path / "cache", log=None)
    b = prepare_data(_text_cfg(root), tmp_path / "cache", log=None)
    assert len(builds) == 1 and a.path == b.path
    assert np.array_equal(a.train, b.train)
    # a different vocabulary or an edited file is a different cache entry
    c = prepare_data(_text_cfg(root, vocab_size=290), tmp_path / "cache", log=None)
    assert len(builds) == 2 and c.path != a.path
    with open(root / "train" / "river.txt", "a") as fh:
        fh.write("One more sentence about the river.\n")
    d = prepare_data(_text_cfg(root), tmp_path / "cache", log=None)
    assert len(builds) == 3 and d.path != a.path and len(d.train) > len(a.train)
    # no temporary folders are left behind
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]


def test_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    a = prepare_data(_text_cfg(), tmp_path, log=None)
    n = len(a.train)
    del a
    with open(next(tmp_path.glob("text-*")) / "train.bin", "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(ValueError, match="train.bin' has 10 bytes"):
        load_prepared(next(tmp_path.glob("text-*")))
    builds = _count_builds(monkeypatch)
    b = prepare_data(_text_cfg(), tmp_path, log=None)
    assert len(builds) == 1 and len(b.train) == n


def test_given_tokenizer_is_used_and_keys_the_cache(tmp_path):
    texts = [p.read_text() for p in sorted((FIXTURES / "train").glob("*.txt"))]
    t1 = Tokenizer.train(texts, 280)
    t1.save(tmp_path / "t1" / "tokenizer.json")
    cfg = dataclasses.replace(_text_cfg(), tokenizer_path=str(tmp_path / "t1" / "tokenizer.json"))
    data = prepare_data(cfg, tmp_path / "cache", log=None)
    assert data.tokenizer.to_str() == t1.to_str()
    assert data.train.tolist()[1:6] == t1.encode(texts[0])[:5]
    t2 = Tokenizer.train(texts, 270)
    t2.save(tmp_path / "t1" / "tokenizer.json")  # same path, different content
    other = prepare_data(cfg, tmp_path / "cache", log=None)
    assert other.path != data.path and other.vocab_size == t2.vocab_size


def test_long_documents_encode_in_pieces_exactly(monkeypatch):
    # trailing spaces before and indentation after newlines: cutting there would change the tokens
    text = "".join(
        f"{'  ' if i % 3 == 0 else ''}Line {i} of a long book, with  double spaces,\ttabs"
        + (" \n" if i % 2 else ".\n") + ("\n" if i % 5 == 0 else "")
        for i in range(400)
    )
    tok = Tokenizer.train([text], 300)
    monkeypatch.setattr(prepare_mod, "_PIECE_CHARS", 200)
    pieces = _pieces(text)
    assert len(pieces) > 20 and "".join(pieces) == text
    ids = [i for p in pieces for i in tok.encode(p)]
    assert ids == tok.encode(text)


def test_facts_source_with_queries(tmp_path):
    cfg = DataConfig(source="facts", num_people=30, vocab_size=400, seed=5)
    data = prepare_data(cfg, tmp_path, log=None)
    corpus = build_fact_corpus(cfg.fact_config())
    assert data.fact_queries == corpus.queries  # round trip through eval.jsonl
    assert data.meta["num_fact_queries"] == len(corpus.queries) == 30 * 5 * 2
    assert data.meta["num_train_docs"] == 30 * 5
    q = data.fact_queries[0]
    ids = data.encode_prompt(q.prompt)
    assert ids[0] == data.eos_id and data.tokenizer.decode(ids[1:]) == q.prompt
    text = data.tokenizer.decode(data.train.tolist())
    assert text.startswith("<|endoftext|>") and corpus.train_docs[0] in text
    longest = max((q.answer for q in data.fact_queries), key=lambda a: len(data.tokenizer.encode(" " + a)))
    assert data.max_answer_tokens() == len(data.tokenizer.encode(" " + longest)) >= 1
    x, y = next(data.train_sampler(batch_size=2, seq_len=16, seed=1))
    assert x.shape == (2, 16) and int(x.max()) < data.vocab_size
    assert len(list(data.val_batches(4, 16, max_windows=8))) == 2
    again = prepare_data(cfg, tmp_path, log=None)
    assert again.fact_queries == data.fact_queries and again.path == data.path


def test_editing_a_template_invalidates_the_facts_cache(tmp_path, monkeypatch):
    cfg = DataConfig(source="facts", num_people=10, vocab_size=300)
    a = prepare_data(cfg, tmp_path, log=None)
    edited = dict(facts_mod.ATTRIBUTES, employer=("{name} toils for {value}.",) * 6)
    monkeypatch.setattr(facts_mod, "ATTRIBUTES", edited)
    b = prepare_data(cfg, tmp_path, log=None)
    assert b.path != a.path
    assert "toils for" in b.tokenizer.decode(b.train.tolist())


def test_token_dtype():
    assert token_dtype(1000) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
