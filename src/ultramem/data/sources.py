"""Reading documents from each source: text files, a Hugging Face dataset, or the generated facts.

`source_fingerprint` is cheap (configuration plus file names, sizes and mtimes, no contents) so the
token cache can be checked before anything is read; `load_documents` does the reading.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from .config import DataConfig
from .facts import FactCorpus, build_fact_corpus, corpus_fingerprint

_GLOB_CHARS = set("*?[")


@dataclass
class Documents:
    train: list[str]
    val: list[str]
    description: str
    facts: FactCorpus | None = None  # set for the "facts" source (holds the evaluation queries)


# ------------------------------------------------------------------------------------------ text
def resolve_text_files(spec: str, field: str) -> list[Path]:
    """A folder (every *.txt below it), a glob pattern, or one file -> sorted list of files."""
    p = Path(spec).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
        what = f"no .txt files in folder '{spec}'"
    elif p.is_file():
        files = [p]
        what = ""
    elif _GLOB_CHARS & set(spec):
        matches = glob.glob(os.path.expanduser(spec), recursive=True)
        files = sorted(Path(f) for f in matches if os.path.isfile(f))
        what = f"no files match glob '{spec}'"
    else:
        raise ValueError(f"{field}: must be an existing folder, file or glob pattern; got '{spec}'")
    if not files:
        raise ValueError(f"{field}: {what}")
    return files


def read_text_documents(spec: str, field: str) -> list[str]:
    """The documents (one a file) of a folder, glob or file, read as UTF-8; errors name `field`."""
    return _read_utf8(resolve_text_files(spec, field), field)


def _read_utf8(files: list[Path], field: str) -> list[str]:
    docs = []
    for f in files:
        try:
            docs.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{field}: file '{f}' is not valid UTF-8 ({e.reason} at byte {e.start})") from e
    return docs


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic document-level split: evenly spaced documents (in the given order) go to val."""
    n = len(docs)
    if n < 2:
        raise ValueError(
            f"val_path: not given, and a val split by document needs >= 2 documents; got {n} "
            "(give val_path / hf_val_split, or more documents)"
        )
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    val_idx = {int((i + 0.5) * n / n_val) for i in range(n_val)}
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


def _file_stats(files: list[Path]) -> list:
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


# ------------------------------------------------------------------------------------------ hf
def _import_datasets():
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "source 'hf' needs the optional `datasets` package: pip install 'ultramem[hf]' (or datasets)"
        ) from e
    return datasets


def _local_data_files(data_files) -> list[Path]:
    if data_files is None:
        return []
    if isinstance(data_files, str):
        specs = [data_files]
    elif isinstance(data_files, dict):
        specs = [s for v in data_files.values() for s in ([v] if isinstance(v, str) else v)]
    else:
        specs = list(data_files)
    files = []
    for s in specs:
        matches = sorted(glob.glob(os.path.expanduser(s), recursive=True))
        files += [Path(f) for f in matches if os.path.isfile(f)]
    return files


def _hf_texts(cfg: DataConfig, split: str) -> list[str]:
    datasets = _import_datasets()
    what = f"{cfg.hf_name!r} (config {cfg.hf_config!r}, split {split!r})"
    try:
        ds = datasets.load_dataset(
            cfg.hf_name, cfg.hf_config, split=split, data_files=cfg.hf_data_files, revision=cfg.hf_revision,
            streaming=cfg.hf_streaming, cache_dir=cfg.hf_cache_dir,
        )
    except Exception as e:  # `datasets` raises many types (FileNotFound, ConnectionError, ValueError...)
        raise ValueError(f"hf_name: could not load dataset {what}: {type(e).__name__}: {e}") from e
    cols = ds.column_names
    if cols is not None and cfg.hf_text_column not in cols:
        raise ValueError(f"hf_text_column: {cfg.hf_text_column!r} is not a column of {what}; columns: {cols}")
    if cfg.hf_streaming:
        texts = []
        for row in ds:
            if len(texts) >= cfg.max_docs:
                break
            if cfg.hf_text_column not in row:
                raise ValueError(
                    f"hf_text_column: {cfg.hf_text_column!r} is not a field of {what}; fields: {sorted(row)}"
                )
            texts.append(row[cfg.hf_text_column])
    else:
        if cfg.max_docs is not None and len(ds) > cfg.max_docs:
            ds = ds.select(range(cfg.max_docs))
        texts = list(ds[cfg.hf_text_column])
    for t in texts:
        if not isinstance(t, str):
            raise ValueError(f"hf_text_column: {cfg.hf_text_column!r} must hold str; got {type(t).__name__}")
    return texts


# ------------------------------------------------------------------------------------------ all
def source_fingerprint(cfg: DataConfig) -> dict:
    """What identifies the source's content without reading it (part of the cache key)."""
    fp: dict = {"config": cfg.key_fields()}
    if cfg.source == "text":
        files = resolve_text_files(cfg.train_path, "train_path")
        if cfg.max_docs is not None:
            files = files[: cfg.max_docs]
        fp["train_files"] = _file_stats(files)
        if cfg.val_path:
            fp["val_files"] = _file_stats(resolve_text_files(cfg.val_path, "val_path"))
    elif cfg.source == "hf":
        fp["local_files"] = _file_stats(_local_data_files(cfg.hf_data_files))
    else:
        fp["facts_tables"] = corpus_fingerprint()
    return fp


def _non_empty(docs: list[str], field: str, where: str) -> list[str]:
    kept = [d for d in docs if d.strip()]
    if not kept:
        raise ValueError(f"{field}: corpus is empty ({len(docs)} documents in {where}, none with text)")
    return kept


def load_documents(cfg: DataConfig) -> Documents:
    """Read (or generate) the train and val documents of a source; empty documents are dropped."""
    if cfg.source == "facts":
        corpus = build_fact_corpus(cfg.fact_config())
        fc = corpus.config
        desc = (f"facts: {fc.num_people} people x {len(fc.attributes)} attributes, {fc.train_templates} train"
                f" / {fc.heldout_templates} held-out templates, {fc.repetitions} repetitions, seed {fc.seed}")
        return Documents(corpus.train_docs, corpus.val_docs, desc, corpus)

    if cfg.source == "text":
        files = resolve_text_files(cfg.train_path, "train_path")
        if cfg.max_docs is not None:
            files = files[: cfg.max_docs]
        train = _non_empty(_read_utf8(files, "train_path"), "train_path", f"'{cfg.train_path}'")
        if cfg.val_path:
            val_docs = _read_utf8(resolve_text_files(cfg.val_path, "val_path"), "val_path")
            val = _non_empty(val_docs, "val_path", f"'{cfg.val_path}'")
            desc = f"text: train '{cfg.train_path}' ({len(train)} docs), val '{cfg.val_path}' ({len(val)})"
        else:
            train, val = split_documents(train, cfg.val_fraction)
            desc = f"text: '{cfg.train_path}' split by document into {len(train)} train / {len(val)} val"
        return Documents(train, val, desc)

    # hf
    train = _non_empty(_hf_texts(cfg, cfg.hf_train_split), "hf_train_split", f"split {cfg.hf_train_split!r}")
    if cfg.hf_val_split:
        val = _non_empty(_hf_texts(cfg, cfg.hf_val_split), "hf_val_split", f"split {cfg.hf_val_split!r}")
        desc = f"hf: {cfg.hf_name} train split {cfg.hf_train_split!r}, val split {cfg.hf_val_split!r}"
    else:
        train, val = split_documents(train, cfg.val_fraction)
        desc = f"hf: {cfg.hf_name} split {cfg.hf_train_split!r} divided by document into train / val"
    return Documents(train, val, f"{desc} ({len(train)} / {len(val)} docs)")
