"""Byte-level BPE tokenizer: train one with the `tokenizers` library, save it, load any tokenizer.json.

The wrapper keeps the surface the rest of the package needs small: encode / encode_batch / decode,
vocab_size and eos_id. Documents are separated by the end-of-text token, so every tokenizer we use
must have one (a loaded tokenizer.json is searched for the usual names, or the name is given).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
# Names used by common tokenizer.json files for the end-of-text / end-of-sequence token.
EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")
BYTE_ALPHABET = 256


def min_vocab_size(num_special: int = 1) -> int:
    """Smallest useful vocabulary: the 256 byte symbols, the special tokens and at least one merge."""
    return BYTE_ALPHABET + num_special + 1


class Tokenizer:
    """Thin wrapper around a `tokenizers.Tokenizer` with a known end-of-text id."""

    def __init__(self, hf_tokenizer: _HFTokenizer, eos_token: str | None = None):
        self._tok = hf_tokenizer
        names = (eos_token,) if eos_token is not None else EOS_CANDIDATES
        for name in names:
            tid = hf_tokenizer.token_to_id(name)
            if tid is not None:
                self.eos_token, self.eos_id = name, tid
                break
        else:
            raise ValueError(
                f"eos_token: tokenizer has no end-of-text token; looked for {list(names)}"
            )

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        special_tokens: Sequence[str] = (EOS_TOKEN,),
        min_frequency: int = 2,
    ) -> Tokenizer:
        """Train a byte-level BPE on `texts`; the first special token is the end-of-text token."""
        if not special_tokens:
            raise ValueError("special_tokens: must contain the end-of-text token; got an empty list")
        lo = min_vocab_size(len(special_tokens))
        if vocab_size < lo:
            raise ValueError(f"vocab_size: must be >= {lo} (256 bytes + specials + 1); got {vocab_size}")
        tok = _HFTokenizer(models.BPE())
        # add_prefix_space=False: a word at a line start stays one pre-token, so a prompt encodes to
        # a prefix of the same text followed by its answer.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(special_tokens),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, eos_token=special_tokens[0])

    @classmethod
    def load(cls, path: str | os.PathLike, eos_token: str | None = None) -> Tokenizer:
        """Load any saved tokenizer.json (ours or a third party's)."""
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise ValueError(f"tokenizer_path: file not found: '{p}'")
        try:
            hf = _HFTokenizer.from_file(str(p))
        except Exception as e:  # the Rust side raises a bare Exception on malformed JSON
            raise ValueError(f"tokenizer_path: '{p}' is not a valid tokenizer.json ({e})") from e
        return cls(hf, eos_token=eos_token)

    def save(self, path: str | os.PathLike) -> Path:
        """Write tokenizer.json atomically (temp file + os.replace); a directory gets tokenizer.json."""
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tokenizer-", suffix=".tmp", dir=p.parent)
        os.close(fd)
        try:
            self._tok.save(tmp)
            os.replace(tmp, p)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return p

    def to_str(self) -> str:
        """The tokenizer.json content (used to fingerprint a tokenizer for the token cache)."""
        return self._tok.to_str()

    # ----------------------------------------------------------------------------- use
    @property
    def vocab_size(self) -> int:
        """Number of ids including special tokens (the embedding table size to use)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: third-party tokenizers may add BOS/CLS; we place EOS ourselves.
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        # Special tokens are kept by default so that a generated end-of-text stays visible to the
        # fact-answer extraction (it cuts there).
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}->{self.eos_id})"
