"""Tests for ultramem.data.sampler: deterministic, exactly resumable training batches; fixed val windows."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ultramem.data.sampler import TrainBatchSampler, ValBatches


def _tokens(n=5000):
    # ids equal to positions: every window must then be an arithmetic run
    return np.arange(n, dtype=np.uint32) % 60000


def test_windows_are_contiguous_and_shifted():
    s = TrainBatchSampler(_tokens(), batch_size=8, seq_len=32, seed=1)
    x, y = next(s)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y - x, torch.ones_like(x))  # consecutive positions
    assert int(y.max()) < 5000 and int(x.min()) >= 0


def test_same_seed_same_batches_other_seed_different():
    a = TrainBatchSampler(_tokens(), 4, 16, seed=7)
    b = TrainBatchSampler(_tokens(), 4, 16, seed=7)
    c = TrainBatchSampler(_tokens(), 4, 16, seed=8)
    xa = [next(a)[0] for _ in range(5)]
    xb = [next(b)[0] for _ in range(5)]
    xc = [next(c)[0] for _ in range(5)]
    assert all(torch.equal(p, q) for p, q in zip(xa, xb, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(xa, xc, strict=True))
    assert not torch.equal(xa[0], xa[1])  # steps differ from each other


def test_exact_resume_from_state_dict():
    full = TrainBatchSampler(_tokens(), 4, 16, seed=3)
    ref = [next(full) for _ in range(10)]
    first = TrainBatchSampler(_tokens(), 4, 16, seed=3)
    for _ in range(4):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    assert state == {"seed": 3, "step": 4}
    resumed = TrainBatchSampler(_tokens(), 4, 16, seed=999)  # seed comes from the state
    resumed.load_state_dict(state)
    for x_ref, y_ref in ref[4:]:
        x, y = next(resumed)
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    assert resumed.state_dict() == {"seed": 3, "step": 10}


def test_batch_is_a_pure_function_of_step():
    s = TrainBatchSampler(_tokens(), 4, 16, seed=0)
    later = s.batch(6)
    for _ in range(3):
        next(s)
    assert torch.equal(s.batch(6)[0], later[0])


def test_windows_cover_the_whole_range():
    n, t = 200, 10
    s = TrainBatchSampler(_tokens(n), 64, t, seed=0)
    starts = np.concatenate([s.starts(i) for i in range(50)])
    assert starts.min() == 0 and starts.max() == n - t - 1  # last valid window is reached
    exact = TrainBatchSampler(_tokens(t + 1), 3, t)  # exactly one window fits
    x, y = next(exact)
    assert torch.equal(x[0], torch.arange(t)) and torch.equal(y[2], torch.arange(1, t + 1))


def test_errors_name_the_field():
    with pytest.raises(ValueError, match=r"seq_len: .*train split has only 100 tokens.*got seq_len 100"):
        TrainBatchSampler(_tokens(100), 2, 100)
    with pytest.raises(ValueError, match=r"seq_len: .*val split"):
        ValBatches(_tokens(50), 2, 64)
    with pytest.raises(ValueError, match=r"batch_size: must be >= 1; got 0"):
        TrainBatchSampler(_tokens(), 0, 8)
    with pytest.raises(ValueError, match=r"'step' must be an integer >= 0; got -1"):
        TrainBatchSampler(_tokens(), 2, 8).load_state_dict({"seed": 0, "step": -1})
    with pytest.raises(ValueError, match=r"'seed' must be an integer"):
        TrainBatchSampler(_tokens(), 2, 8).load_state_dict({"step": 0})
    with pytest.raises(ValueError, match=r"max_windows: must be >= 1"):
        ValBatches(_tokens(), 2, 8, max_windows=0)


def test_val_windows_fixed_and_non_overlapping():
    v = ValBatches(_tokens(1000), batch_size=7, seq_len=50)
    assert v.num_windows == 19 and len(v) == 3  # (1000 - 1) // 50 windows, ceil(19 / 7) batches
    first = [(x.clone(), y.clone()) for x, y in v]
    second = list(v)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second, strict=True))
    xs = torch.cat([x for x, _ in first])
    assert xs.shape == (19, 50)
    assert torch.equal(xs[:, 0], torch.arange(19) * 50)  # consecutive windows from the start
    assert torch.equal(torch.cat([y for _, y in first])[:, -1], torch.arange(19) * 50 + 50)
    assert first[-1][0].shape[0] == 19 - 14  # last batch is partial


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 400), seq_len=st.integers(1, 40), batch=st.integers(1, 9),
       max_windows=st.one_of(st.none(), st.integers(1, 30)))
def test_val_window_invariants(n, seq_len, batch, max_windows):
    if n < seq_len + 1:
        return
    v = ValBatches(_tokens(n), batch, seq_len, max_windows=max_windows)
    n_all = (n - 1) // seq_len
    expect = n_all if max_windows is None else min(n_all, max_windows)
    assert v.num_windows == expect
    starts = torch.cat([x[:, 0] for x, _ in v]).numpy()
    assert len(starts) == expect and np.all(np.diff(starts) >= seq_len)  # sorted, no overlap
    assert starts[0] == 0 and (expect == 1 or starts[-1] == (n_all - 1) * seq_len)  # spans the split
    ys = torch.cat([y for _, y in v])
    assert int(ys.max()) <= n - 1
