"""SparseValueAdamW against dense torch AdamW, a closed form and a plain per-row reference."""

import copy
import math

import pytest
import torch
from torch import nn

from ultramem.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ultramem.optim import SparseValueAdamW, build_optimizer

R, D = 12, 5
BETAS, EPS, WD = (0.9, 0.95), 1e-8, 0.1
# touched rows per step: rows 9-11 never, row 0 only at steps 0 and 5 (a long skip)
TOUCHED = [[0, 1, 2, 2], [3, 4], [1, 5, 6], [2, 4, 6, 8], [], [0, 1, 7], [3, 8]]
LRS = [1e-2, 3e-2, 2e-2, 5e-2, 4e-2, 1e-2, 2.5e-2]


def grads(seed=0):
    """One row-sparse COO gradient per step (duplicate ids included, so coalescing matters)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows in TOUCHED:
        idx = torch.tensor(rows, dtype=torch.long).reshape(1, -1)
        out.append(torch.sparse_coo_tensor(idx, torch.randn(len(rows), D, generator=g), (R, D)))
    return out


def run(opt, p, gs, lrs=LRS):
    for g, lr in zip(gs, lrs, strict=True):
        for grp in opt.param_groups:
            grp["lr"] = lr
        p.grad = g
        opt.step()


def make(w0, **kw):
    p = nn.Parameter(w0.clone())
    return p, SparseValueAdamW([p], lr=LRS[0], betas=BETAS, eps=EPS, weight_decay=WD, **kw)


def test_exact_mode_equals_dense_adamw_bitwise():
    w0 = torch.randn(R, D, generator=torch.Generator().manual_seed(1))
    p, opt = make(w0, exact=True)
    q = nn.Parameter(w0.clone())
    ref = torch.optim.AdamW([q], lr=LRS[0], betas=BETAS, eps=EPS, weight_decay=WD, foreach=False)
    for g, lr in zip(grads(), LRS, strict=True):
        for o in (opt, ref):
            o.param_groups[0]["lr"] = lr
        p.grad, q.grad = g, g.to_dense()
        opt.step()
        ref.step()
        assert torch.equal(p, q)  # every row, untouched ones included, bit for bit
    st, rst = opt.state[p], ref.state[q]
    assert torch.equal(st["exp_avg"], rst["exp_avg"]) and torch.equal(st["exp_avg_sq"], rst["exp_avg_sq"])
    # the fused CPU kernel orders its ops differently: equal to ~1 ulp, not bits
    f = nn.Parameter(w0.clone())
    fused = torch.optim.AdamW([f], lr=LRS[0], betas=BETAS, eps=EPS, weight_decay=WD, fused=True)
    run(fused, f, [g.to_dense() for g in grads()])
    torch.testing.assert_close(f, p, rtol=1e-6, atol=1e-7)


def lazy_reference(w0, gs, lrs, row_state="full", first_moment=True):
    """Plain float64 per-row loop of the documented lazy semantics, written independently."""
    w = w0.double().clone()
    m, v = torch.zeros(R, D, dtype=torch.float64), torch.zeros(R, D, dtype=torch.float64)
    last = [0] * R
    for t, (g, lr) in enumerate(zip(gs, lrs, strict=True), start=1):
        dense = g.to_dense().double()
        for r in sorted(set(g.coalesce().indices()[0].tolist())):
            w[r] *= math.prod(1 - lrs[s - 1] * WD for s in range(last[r] + 1, t + 1))
            last[r] = t
            m[r] = BETAS[0] * m[r] + (1 - BETAS[0]) * dense[r]
            sq = dense[r] ** 2 if row_state == "full" else (dense[r] ** 2).mean().expand(D)
            v[r] = BETAS[1] * v[r] + (1 - BETAS[1]) * sq
            denom = (v[r] / (1 - BETAS[1] ** t)).sqrt() + EPS
            num = m[r] / (1 - BETAS[0] ** t) if first_moment else dense[r]
            w[r] -= lr * num / denom
    for r in range(R):  # flush: the decay of every step since the row's last touch
        w[r] *= math.prod(1 - lrs[s - 1] * WD for s in range(last[r] + 1, len(gs) + 1))
    return w


@pytest.mark.parametrize("row_state,first_moment", [("full", True), ("row", True), ("row", False),
                                                    ("full", False)])
def test_lazy_updates_match_plain_reference(row_state, first_moment):
    w0 = torch.randn(R, D, generator=torch.Generator().manual_seed(2))
    p, opt = make(w0, row_state=row_state, first_moment=first_moment)
    run(opt, p, grads())
    st = opt.state[p]
    assert st["exp_avg_sq"].shape == ((R, D) if row_state == "full" else (R,))
    assert ("exp_avg" in st) == first_moment
    assert st["last_step"].tolist() == [6, 6, 4, 7, 4, 3, 4, 6, 7, 0, 0, 0]  # last touch (1-indexed)
    opt.flush_decay()
    want = lazy_reference(w0, grads(), LRS, row_state, first_moment)
    torch.testing.assert_close(p.detach().double(), want, rtol=2e-6, atol=1e-7)


def test_lazy_decay_equals_closed_form_and_dense_on_untouched_rows():
    w0 = torch.randn(R, D, generator=torch.Generator().manual_seed(3))
    p, opt = make(w0)
    gs = grads()
    run(opt, p, gs)
    # rows 9-11 never touched: nothing applied yet, the whole product on flush
    assert torch.equal(p[9:], w0[9:])
    opt.flush_decay()
    closed = math.prod(1 - lr * WD for lr in LRS)
    torch.testing.assert_close(p[9:].double(), w0[9:].double() * closed, rtol=1e-6, atol=0)
    # ... and equal to dense AdamW there (zero moments: decay only), to fp32 rounding
    q = nn.Parameter(w0.clone())
    ref = torch.optim.AdamW([q], lr=LRS[0], betas=BETAS, eps=EPS, weight_decay=WD, foreach=False)
    run(ref, q, [g.to_dense() for g in gs])
    torch.testing.assert_close(p[9:], q[9:], rtol=1e-6, atol=0)
    assert opt.state[p]["last_step"].tolist() == [len(LRS)] * R
    opt.flush_decay()  # idempotent once up to date
    torch.testing.assert_close(p[9:].double(), w0[9:].double() * closed, rtol=1e-6, atol=0)


def test_sparse_and_dense_gradients_give_the_same_update():
    w0 = torch.randn(R, D, generator=torch.Generator().manual_seed(4))
    (p, a), (q, b) = make(w0), make(w0)
    run(a, p, grads())
    run(b, q, [g.to_dense() for g in grads()])  # non-zero rows = the touched ones
    assert torch.equal(p, q)
    assert all(torch.equal(a.state[p][k], b.state[q][k]) for k in a.state[p])


def test_resume_mid_run_equals_uninterrupted(tmp_path):
    w0 = torch.randn(R, D, generator=torch.Generator().manual_seed(5))
    gs = grads()
    p, full = make(w0, row_state="row")
    run(full, p, gs)
    model = nn.Module()
    model.w = nn.Parameter(w0.clone())
    first = SparseValueAdamW([model.w], lr=LRS[0], betas=BETAS, eps=EPS, weight_decay=WD, row_state="row")
    run(first, model.w, gs[:3], LRS[:3])
    save_checkpoint(tmp_path / "c.safetensors", model, step=3, optimizer=first, rng=False)
    fresh = nn.Module()
    fresh.w = nn.Parameter(torch.zeros(R, D))
    second = SparseValueAdamW([fresh.w], lr=1.0, betas=BETAS, eps=EPS, weight_decay=WD, row_state="row")
    load_checkpoint(tmp_path / "c.safetensors", fresh, second)
    assert second.state[fresh.w]["log_decay"].dtype == torch.float64
    assert second.state[fresh.w]["last_step"].dtype == torch.int32
    run(second, fresh.w, gs[3:], LRS[3:])
    assert torch.equal(fresh.w, p)
    assert all(torch.equal(second.state[fresh.w][k], full.state[p][k]) for k in ("exp_avg_sq", "last_step"))
    wrong = SparseValueAdamW([nn.Parameter(torch.zeros(R + 1, D))], row_state="row")
    with pytest.raises(CheckpointError, match="rows"):
        load_checkpoint(tmp_path / "c.safetensors", None, wrong)


class Table(nn.Module):
    def __init__(self, rows=4096, dim=8):
        super().__init__()
        self.emb = nn.Embedding(rows, dim)
        self.gain = nn.Parameter(torch.ones(dim))

    def value_parameters(self):
        return [self.emb.weight]

    def forward(self, idx):
        return (self.emb(idx) * self.gain).square().sum()


def test_build_optimizer_value_paths_and_checkpoint_round_trip(tmp_path, monkeypatch):
    import ultramem.optim as optim

    assert build_optimizer(Table(), lr=1e-2, value_optimizer="auto").value_paths == {"emb.weight": "adamw"}
    monkeypatch.setattr(optim, "AUTO_SPARSE_MIN_PARAMS", 4096 * 8)
    torch.manual_seed(0)
    a = Table()
    b = copy.deepcopy(a)
    oa = build_optimizer(a, lr=1e-2, total_steps=8, value_optimizer="auto", value_weight_decay=0.1)
    assert oa.value_paths == {"emb.weight": "sparse"} and a.emb.sparse  # table switched to sparse grads
    assert oa.describe_value_paths() == "emb.weight (32,768 params): SparseValueAdamW"
    ob = build_optimizer(b, lr=1e-2, total_steps=8, value_optimizer="sparse", value_weight_decay=0.1)
    for step in range(4):
        for m, o in ((a, oa), (b, ob)):
            o.set_step(step)
            o.zero_grad()
            m(torch.tensor([step, 7, 100 + step])).backward()
            o.step()
    oa.set_step(0)  # the value group keeps its lr multiplier (4x at step 0)
    assert oa.rowsparse.param_groups[0]["lr"] == pytest.approx(4 * oa.lrs()["no_decay"])
    oa.flush_decay()
    save_checkpoint(tmp_path / "c.safetensors", a, step=4, optimizer=oa, rng=False)
    load_checkpoint(tmp_path / "c.safetensors", b, ob)
    assert torch.equal(a.emb.weight, b.emb.weight)
    sa, sb = oa.rowsparse.state[a.emb.weight], ob.rowsparse.state[b.emb.weight]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    row = build_optimizer(Table(), lr=1e-2, value_optimizer="sparse_row")
    assert row.rowsparse.param_groups[0]["row_state"] == "row"
    with pytest.raises(CheckpointError, match="rowsparse"):
        load_checkpoint(tmp_path / "c.safetensors", Table(), build_optimizer(Table(), lr=1e-2))


@pytest.mark.parametrize("kw,field", [({"lr": 0.0}, "lr"), ({"betas": (0.9, 1.0)}, "betas"),
                                      ({"eps": -1.0}, "eps"), ({"weight_decay": -0.1}, "weight_decay"),
                                      ({"row_state": "col"}, "row_state"),
                                      ({"first_moment": 1}, "first_moment"), ({"exact": "yes"}, "exact")])
def test_bad_arguments_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        SparseValueAdamW([nn.Parameter(torch.zeros(3, 2))], **kw)


def test_bad_value_optimizer_and_decay_overflow():
    with pytest.raises(ValueError, match="^value_optimizer:"):
        build_optimizer(Table(), lr=1e-2, value_optimizer="lazy")
    sparse_table = Table()
    sparse_table.emb.sparse = True  # the legacy SparseAdam path cannot decay
    with pytest.raises(ValueError, match="^value_weight_decay:"):
        build_optimizer(sparse_table, lr=1e-2, value_weight_decay=0.1)
    p = nn.Parameter(torch.zeros(3, 2))
    opt = SparseValueAdamW([p], lr=2.0, weight_decay=0.5)
    p.grad = torch.ones(3, 2)
    with pytest.raises(ValueError, match="^weight_decay:"):
        opt.step()


def test_trainer_sparse_value_path_logs_and_resumes_exactly(tmp_path):
    """Through the trainer: the log names each table's path, lazy decay is flushed at evals and
    checkpoints, and stop + resume equals a run that checkpointed at the same step, bit for bit."""
    from ultramem.data import DataConfig, prepare_data
    from ultramem.train import RunConfig, train

    data = {"num_people": 16, "vocab_size": 300, "fact_repetitions": 2}
    prepare_data(DataConfig(**data), tmp_path / "cache", log=None)
    model = {"dim": 32, "n_layers": 2, "n_heads": 2, "ffn": "ultramem", "memory_placement": "0:1",
             "memory": {"num_keys": 8, "key_dim": 16, "heads": 2, "topk": 4}}

    def cfg(name, **kw):
        t = {"out_dir": str(tmp_path / name), "cache_dir": str(tmp_path / "cache"), "steps": 8,
             "batch_size": 4, "seq_len": 16, "warmup_steps": 2, "log_every": 1, "eval_every": 3,
             "fact_queries": 0, "eval_windows": 4, "memory_diagnostics": False, "progress": False,
             "threads": 1, "value_optimizer": "sparse_row", "value_weight_decay": 0.1, **kw}
        return RunConfig.from_dict({"model": model, "data": data, "train": t})

    lines = []
    full = train(cfg("a", ckpt_every=4), log=lines.append)
    assert any("SparseValueAdamW row-state" in line for line in lines)
    halves = cfg("b", stop_after=4)
    train(halves, log=lambda *_: None)
    halves.train.stop_after, halves.train.resume = None, True
    second = train(halves, log=lambda *_: None)
    assert [v for _, v in second["losses"]] == [v for _, v in full["losses"]][4:]
    assert second["val_loss"] == full["val_loss"]


def test_bench_sweep_prints_table_and_one_json_line(capsys):
    import json

    from ultramem.bench.optim_bench import main

    main(["--table-values", "1000,8000", "--params-per-value", "4", "--row-dim", "8", "--touched", "64",
          "--steps", "2"])
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert summary["largest_params"] == 32000 and len(summary["rows"]) == 10
    ratios = summary["state_ratio_at_largest"]
    assert ratios["adamw"] == pytest.approx(2.0, rel=1e-3) and ratios["sparse"] > 2.1  # + int32 step per row
    assert ratios["sparse_row"] == pytest.approx(1 + 2 / 8, rel=1e-2)  # m; v, step per 8-wide row; history
    assert ratios["sparse_row_no_m"] == pytest.approx(2 / 8, rel=1e-2)
