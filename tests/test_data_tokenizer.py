"""Tests for ultramem.data.tokenizer: BPE training, save/load round trip, third-party tokenizer.json."""

from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from ultramem.data.tokenizer import EOS_TOKEN, Tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "text"


def _texts():
    return [p.read_text(encoding="utf-8") for p in sorted((FIXTURES / "train").glob("*.txt"))]


def test_train_save_load_round_trip(tmp_path):
    tok = Tokenizer.train(_texts(), vocab_size=320)
    assert 256 < tok.vocab_size <= 320
    assert tok.token_to_id(EOS_TOKEN) == tok.eos_id
    path = tok.save(tmp_path)  # a folder gets tokenizer.json
    assert path == tmp_path / "tokenizer.json" and path.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic write left nothing
    loaded = Tokenizer.load(path)
    assert loaded.vocab_size == tok.vocab_size and loaded.eos_id == tok.eos_id
    for text in [*_texts(), "naïve café, 東京 and emoji 🙂 never seen in training\n\ttabs  spaces"]:
        ids = tok.encode(text)
        assert loaded.encode(text) == ids
        assert loaded.decode(ids) == text  # byte-level: lossless even for unseen characters
    # training merges something: common text is shorter in tokens than in bytes
    sample = _texts()[0]
    assert len(tok.encode(sample)) < 0.8 * len(sample.encode())


def test_training_is_deterministic():
    a = Tokenizer.train(_texts(), vocab_size=300).to_str()
    b = Tokenizer.train(_texts(), vocab_size=300).to_str()
    assert a == b


def test_eos_is_kept_by_decode_and_not_added_by_encode():
    tok = Tokenizer.train(_texts(), vocab_size=300)
    ids = tok.encode("The harbour")
    assert tok.eos_id not in ids
    assert tok.decode([tok.eos_id] + ids) == EOS_TOKEN + "The harbour"
    assert tok.decode([tok.eos_id] + ids, skip_special_tokens=True) == "The harbour"


def _foreign_tokenizer(tmp_path, special):
    hf = HFTokenizer(models.BPE(unk_token=None))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.add_special_tokens([special])
    path = tmp_path / "foreign.json"
    hf.save(str(path))
    return path


def test_load_third_party_tokenizer_finds_eos(tmp_path):
    tok = Tokenizer.load(_foreign_tokenizer(tmp_path, "</s>"))
    assert tok.eos_token == "</s>" and tok.eos_id == tok.token_to_id("</s>")


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="eos_token"):
        Tokenizer.load(_foreign_tokenizer(tmp_path, "<mask>"))
    with pytest.raises(ValueError, match="tokenizer_path: file not found"):
        Tokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.load(bad)


def test_vocab_too_small():
    with pytest.raises(ValueError, match=r"vocab_size: must be >= 258.*got 100"):
        Tokenizer.train(_texts(), vocab_size=100)
