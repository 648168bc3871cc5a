"""prepare_data: documents -> tokenizer -> memory-mapped token files, built once and cached.

Cache layout, one folder per key under `cache_dir` (key = hash of the source fingerprint, the
tokenizer recipe or file, and the cache format):

    <source>-<key>/tokenizer.json   the tokenizer the tokens were made with
                   train.bin        flat token ids (uint16 if the vocabulary fits, else uint32);
                   val.bin          every document is preceded by <|endoftext|>
                   eval.jsonl       fact queries (facts source only)
                   meta.json        counts, dtype, vocab, description; written last

The folder is built under a temporary name and renamed into place (atomic on POSIX), so a crash or
a concurrent run never leaves a half-written cache that looks complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tokenizers

from .config import DataConfig
from .facts import FactQuery
from .sampler import TrainBatchSampler, ValBatches
from .sources import load_documents, source_fingerprint
from .tokenizer import Tokenizer

CACHE_FORMAT = 1
_PIECE_CHARS = 1 << 16  # long documents are encoded in pieces so encode_batch can use every core
_FLUSH_CHARS = 1 << 21


@dataclass
class PreparedData:
    train: np.ndarray  # (N_train,) token ids, read-only memmap
    val: np.ndarray  # (N_val,)
    tokenizer: Tokenizer
    meta: dict
    path: Path  # the cache folder
    fact_queries: list[FactQuery] = field(default_factory=list)  # empty unless source == "facts"

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    def encode_prompt(self, prompt: str) -> list[int]:
        """Prompt ids as the model saw document starts in training: <|endoftext|> + text."""
        return [self.tokenizer.eos_id] + self.tokenizer.encode(prompt)

    def max_answer_tokens(self) -> int:
        """Tokens of the longest fact answer (with its leading space); generate this many + 1 so the
        sentence end after the answer is produced too. 0 when there are no fact queries."""
        answers = {q.answer for q in self.fact_queries}
        return max((len(self.tokenizer.encode(" " + a)) for a in answers), default=0)

    def train_sampler(self, batch_size: int, seq_len: int, seed: int = 0, device=None) -> TrainBatchSampler:
        return TrainBatchSampler(self.train, batch_size, seq_len, seed=seed, device=device)

    def val_batches(
        self, batch_size: int, seq_len: int, max_windows: int | None = None, device=None
    ) -> ValBatches:
        return ValBatches(self.val, batch_size, seq_len, max_windows=max_windows, device=device)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(cfg: DataConfig) -> str:
    if cfg.tokenizer_path is not None:
        path = cfg.tokenizer_path
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer_path: file not found: '{cfg.tokenizer_path}'")
        tok = {"file_sha256": _sha256_file(path)}
    else:  # training may change with the library version, so it is part of the recipe
        tok = {"bpe": cfg.vocab_size, "chars": cfg.tokenizer_train_chars, "lib": tokenizers.__version__}
    blob = json.dumps({"format": CACHE_FORMAT, "source": source_fingerprint(cfg), "tokenizer": tok},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _bpe_sample(docs: list[str], max_chars: int) -> Iterator[str]:
    """The same leading fraction of every document, so the sample mirrors the corpus mix."""
    total = sum(len(d) for d in docs)
    frac = min(1.0, max_chars / max(total, 1))
    for d in docs:
        yield d[: math.ceil(len(d) * frac)]


def _pieces(doc: str) -> list[str]:
    """Split a long document after a newline that sits between two non-space characters: there the
    byte-level pre-tokenizer splits anyway, so pieces encode exactly like the whole."""
    out, start = [], 0
    while len(doc) - start > _PIECE_CHARS:
        i = doc.find("\n", start + _PIECE_CHARS)
        while 0 < i < len(doc) - 1 and (doc[i - 1].isspace() or doc[i + 1].isspace()):
            i = doc.find("\n", i + 1)
        if not 0 < i < len(doc) - 1:
            break
        out.append(doc[start : i + 1])
        start = i + 1
    out.append(doc[start:])
    return out


def _write_tokens(tok: Tokenizer, docs: list[str], path: Path, dtype: np.dtype) -> int:
    total = 0
    pieces: list[str] = []
    starts: list[bool] = []

    def flush(fh):
        nonlocal total
        out: list[int] = []
        for is_start, ids in zip(starts, tok.encode_batch(pieces), strict=True):
            if is_start:
                out.append(tok.eos_id)
            out.extend(ids)
        arr = np.asarray(out, dtype=dtype)
        arr.tofile(fh)
        total += arr.size
        pieces.clear()
        starts.clear()

    with open(path, "wb") as fh:
        size = 0
        for doc in docs:
            for k, piece in enumerate(_pieces(doc)):
                pieces.append(piece)
                starts.append(k == 0)
                size += len(piece)
                if size >= _FLUSH_CHARS:
                    flush(fh)
                    size = 0
        if pieces:
            flush(fh)
    return total


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _build(cfg: DataConfig, tmp: Path, key: str, log: Callable[[str], None]) -> None:
    t0 = time.time()
    docs = load_documents(cfg)
    n_chars = sum(len(d) for d in docs.train)
    log(f"data: {docs.description}; {n_chars / 1e6:.2f} M train chars")
    if cfg.tokenizer_path is not None:
        tok = Tokenizer.load(cfg.tokenizer_path)
    else:
        log(f"data: training byte-level BPE, vocab {cfg.vocab_size}")
        tok = Tokenizer.train(_bpe_sample(docs.train, cfg.tokenizer_train_chars), cfg.vocab_size)
    tok.save(tmp / "tokenizer.json")
    dtype = token_dtype(tok.vocab_size)
    n_train = _write_tokens(tok, docs.train, tmp / "train.bin", dtype)
    n_val = _write_tokens(tok, docs.val, tmp / "val.bin", dtype)
    if docs.facts is not None:
        lines = [json.dumps(dataclasses.asdict(q)) for q in docs.facts.queries]
        (tmp / "eval.jsonl").write_text("\n".join(lines) + "\n")
    meta = {
        "format": CACHE_FORMAT, "key": key, "source": cfg.source, "description": docs.description,
        "config": cfg.key_fields(), "dtype": dtype.name, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
        "num_train_tokens": n_train, "num_val_tokens": n_val,
        "num_train_docs": len(docs.train), "num_val_docs": len(docs.val),
        "num_fact_queries": len(docs.facts.queries) if docs.facts is not None else 0,
        "tokenizer": cfg.tokenizer_path or "trained", "created_unix": time.time(),
    }
    _write_json(tmp / "meta.json", meta)
    log(f"data: {n_train:,} train / {n_val:,} val tokens ({dtype.name}) in {time.time() - t0:.1f}s")


def load_prepared(path: str | os.PathLike) -> PreparedData:
    """Open a prepared cache folder (as written by prepare_data)."""
    p = Path(path)
    meta_path = p / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"data cache: cannot read '{meta_path}' ({e})") from e
    if meta.get("format") != CACHE_FORMAT:
        raise ValueError(f"data cache: '{meta_path}' has format {meta.get('format')!r}, not {CACHE_FORMAT}")
    dtype = np.dtype(meta["dtype"])
    arrays = {}
    for split in ("train", "val"):
        f, n = p / f"{split}.bin", meta[f"num_{split}_tokens"]
        size = f.stat().st_size if f.is_file() else -1
        if size != n * dtype.itemsize or n == 0:
            raise ValueError(f"data cache: '{f}' has {size} bytes, meta.json says {n} {dtype.name} tokens")
        arrays[split] = np.memmap(f, dtype=dtype, mode="r", shape=(n,))
    tok = Tokenizer.load(p / "tokenizer.json")
    if tok.vocab_size != meta["vocab_size"]:
        raise ValueError(
            f"data cache: '{p / 'tokenizer.json'}' vocab {tok.vocab_size} != meta.json {meta['vocab_size']}"
        )
    queries = []
    if (p / "eval.jsonl").is_file():
        lines = (p / "eval.jsonl").read_text().splitlines()
        queries = [FactQuery(**json.loads(line)) for line in lines if line]
    return PreparedData(arrays["train"], arrays["val"], tok, meta, p, queries)


def prepare_data(
    cfg: DataConfig, cache_dir: str | os.PathLike, log: Callable[[str], None] | None = print
) -> PreparedData:
    """Return the tokenised data for `cfg`, building and caching it under `cache_dir` on first use."""
    log = log or (lambda _msg: None)
    cfg.validate()
    cache_dir = Path(cache_dir)
    key = cache_key(cfg)
    final = cache_dir / f"{cfg.source}-{key}"
    if final.is_dir():
        try:
            data = load_prepared(final)
            log(f"data: using cache {final}")
            return data
        except ValueError as e:  # damaged cache (e.g. disk full mid-copy): set it aside and rebuild
            log(f"data: rebuilding damaged cache ({e})")
            broken = final.with_name(f".{final.name}.broken-{uuid.uuid4().hex[:8]}")
            os.replace(final, broken)
            shutil.rmtree(broken, ignore_errors=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _build(cfg, tmp, key, log)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same key first; its result is equivalent
            if not (final / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"data: cached at {final}")
    return load_prepared(final)
