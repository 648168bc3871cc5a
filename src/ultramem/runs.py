"""Run folders: what a training run writes, who may write it, and loading a finished run.

A run lives in `train.out_dir`:

    config.json             the resolved run config (vocab_size and max_seq_len filled in)
    tokenizer.json          a copy of the data's tokenizer, so generate needs no data cache
    metrics.jsonl           one JSON object a line: kind "params", "train" or "eval"
    checkpoint.safetensors  latest checkpoint (model, optimiser, RNG, sampler position)
    .lock                   held (flock) by the process training into the folder

Rules: a folder that holds a run is never overwritten unless asked (`--overwrite`) and never
resumed silently (`--resume` needs a checkpoint); one process at a time (the lock names its
holder; the kernel drops it when the holder dies, so a stale lock cannot block); temp files left
by a killed save are removed when the next run opens the folder.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import warnings
from pathlib import Path

from .checkpoint import CHECKPOINT_NAME, atomic_write_text, load_checkpoint, read_checkpoint_meta

RUN_FILES = ("config.json", "metrics.jsonl", CHECKPOINT_NAME, "tokenizer.json")
LOCK_NAME = ".lock"


class RunFolderError(ValueError):
    """A run folder cannot be used as asked (it holds another run, is locked, or is not writable)."""


def open_run_dir(out_dir) -> Path:
    """Create the folder (with a clear error when that is impossible) and drop stale temp files."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RunFolderError(f"train.out_dir: cannot write to '{out}' ({e.strerror or e})") from None
    for tmp in out.glob(".*.tmp"):  # from a save killed between write and rename
        tmp.unlink(missing_ok=True)
    return out


def existing_run_files(out: Path) -> list[str]:
    return [name for name in RUN_FILES if (out / name).exists()]


def clear_run(out: Path) -> None:
    """Remove a previous run's files (only those; anything else in the folder stays)."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


class RunLock:
    """Exclusive lock on a run folder for the life of a training process (fcntl.flock)."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise RunFolderError(f"train.out_dir: '{self.path.parent}' is in use by another training "
                                     f"process (PID {holder}); wait for it or use another folder") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing releases the flock
            self.fd = None


class MetricsLog:
    """Append-only JSONL; on resume, records after the checkpoint's step are dropped first."""

    def __init__(self, path: Path, keep_until_step: int | None):
        self.path = path
        if keep_until_step is None or not path.exists():
            path.write_text("")
        else:
            kept = [json.dumps(r) for r in read_metrics(path) if r.get("step", 0) <= keep_until_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write(self, **record) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path) -> list[dict]:
    """The records of a run's metrics.jsonl. A damaged last line (a process killed mid-write) is
    dropped with a warning; a damaged line anywhere else is an error naming the file and line."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    lines = [(n, line) for n, line in enumerate(p.read_text().splitlines(), 1) if line.strip()]
    out = []
    for i, (n, line) in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                warnings.warn(f"{p}: dropped a damaged last line {n} (an interrupted write): {e}",
                              RuntimeWarning, stacklevel=2)
                break
            raise ValueError(f"{p}: line {n} is not valid JSON: {e}") from None
    return out


def load_run(path, device: str = "cpu"):
    """(model, run config dict, tokenizer or None, checkpoint) from a run dir or checkpoint file."""
    from .data import Tokenizer
    from .model import LanguageModel, LMConfig

    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device: {device!r} requested but no CUDA device is available here")
    meta = read_checkpoint_meta(path)
    if not meta.get("model_config"):
        raise ValueError(f"{path}: checkpoint has no model config; cannot rebuild the model")
    mcfg = LMConfig.from_dict(meta["model_config"])
    model = LanguageModel(mcfg)
    ckpt = load_checkpoint(path, model, expect_model_config=mcfg.to_dict(),
                           normalize_config=normalize_model_config)
    model.to(device).eval()
    tok_path = ckpt.path.parent / "tokenizer.json"
    tok = Tokenizer.load(tok_path) if tok_path.is_file() else None
    return model, meta.get("train_config") or {}, tok, ckpt


def normalize_model_config(d: dict) -> dict:
    """A saved model config in today's full form (older checkpoints stored only the memory fields
    that were set, and `{}` for no memory)."""
    from .model import LMConfig

    return LMConfig.from_dict(d).to_dict()
