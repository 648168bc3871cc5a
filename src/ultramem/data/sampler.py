"""Batches of token windows: random ones for training (exactly resumable), fixed ones for evaluation.

Shape legend: B batch size, T sequence length; a window holds T+1 tokens, x_BT = window[:, :-1] and
y_BT = window[:, 1:] (next-token targets).

The training batch for step n depends only on (seed, n): its window starts are drawn from a PCG64
generator seeded with SeedSequence([seed, n]). So the sampler's whole state is {"seed", "step"},
a resumed run sees exactly the batches of the uninterrupted one, and no generator state needs saving.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def _check_sizes(tokens: np.ndarray, batch_size: int, seq_len: int, what: str) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1; got {batch_size}")
    if seq_len < 1:
        raise ValueError(f"seq_len: must be >= 1; got {seq_len}")
    if tokens.ndim != 1:
        raise ValueError(f"tokens: must be a 1-D array of token ids; got shape {tuple(tokens.shape)}")
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"seq_len: a window needs seq_len + 1 tokens but the {what} split has only {len(tokens)} tokens; "
            f"got seq_len {seq_len}"
        )


def _to_torch(w_BW: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    w_BW = torch.from_numpy(w_BW.astype(np.int64))
    x_BT, y_BT = w_BW[:, :-1].contiguous(), w_BW[:, 1:].contiguous()
    if device is not None and torch.device(device).type != "cpu":
        x_BT = x_BT.pin_memory().to(device, non_blocking=True)
        y_BT = y_BT.pin_memory().to(device, non_blocking=True)
    return x_BT, y_BT


class TrainBatchSampler:
    """Random (seq_len + 1)-token windows from the train tokens; `next(sampler)` -> (x_BT, y_BT) int64."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0, step: int = 0,
                 device: str | torch.device | None = None):
        _check_sizes(tokens, batch_size, seq_len, "train")
        self.tokens, self.batch_size, self.seq_len, self.device = tokens, batch_size, seq_len, device
        self.load_state_dict({"seed": seed, "step": step})

    def starts(self, step: int) -> np.ndarray:
        """Window start offsets (B,) for a given step; a pure function of (seed, step)."""
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, step])))
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx_BW = self.starts(step)[:, None] + np.arange(self.seq_len + 1)
        return _to_torch(np.asarray(self.tokens[idx_BW]), self.device)

    def __iter__(self) -> TrainBatchSampler:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.batch(self.step)
        self.step += 1
        return out

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        for k in ("seed", "step"):
            v = state.get(k)
            # bool is an int subclass but never a meaningful seed/step
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
                raise ValueError(f"sampler state: '{k}' must be an integer >= 0; got {v!r}")
        self.seed, self.step = int(state["seed"]), int(state["step"])


class ValBatches:
    """Fixed evaluation windows: consecutive, non-overlapping windows from the start of the split
    (targets included), or `max_windows` of them spread evenly over the split. Iterating again yields
    the same batches; the last batch may be smaller."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, max_windows: int | None = None,
                 device: str | torch.device | None = None):
        _check_sizes(tokens, batch_size, seq_len, "val")
        if max_windows is not None and max_windows < 1:
            raise ValueError(f"max_windows: must be >= 1 or None; got {max_windows}")
        self.tokens, self.batch_size, self.seq_len, self.device = tokens, batch_size, seq_len, device
        n_all = (len(tokens) - 1) // seq_len
        chosen = np.arange(n_all)
        if max_windows is not None and max_windows < n_all:
            chosen = np.unique(np.linspace(0, n_all - 1, max_windows).round().astype(np.int64))
        self.window_starts = chosen * seq_len

    @property
    def num_windows(self) -> int:
        return len(self.window_starts)

    @property
    def num_tokens(self) -> int:
        """Number of predicted tokens per full pass (what a mean loss averages over)."""
        return self.num_windows * self.seq_len

    def __len__(self) -> int:
        return -(-self.num_windows // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        offs_W = np.arange(self.seq_len + 1)
        for i in range(0, self.num_windows, self.batch_size):
            idx_BW = self.window_starts[i : i + self.batch_size, None] + offs_W
            yield _to_torch(np.asarray(self.tokens[idx_BW]), self.device)
