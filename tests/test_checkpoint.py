import builtins
import json
import random
import struct

import numpy as np
import pytest
import torch
from torch import nn

import ultramem.checkpoint as ckpt_mod
from ultramem import UltraMemConfig, UltraMemLayer
from ultramem.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from ultramem.optim import build_optimizer


class Tiny(nn.Module):
    def __init__(self, dim=16, vocab=20, sparse=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mem = UltraMemLayer(UltraMemConfig(dim=dim, num_keys=4, key_dim=8, value_dim=8, heads=2, topk=4,
                                                sparse_values=sparse))
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def value_parameters(self):
        return self.mem.value_parameters()

    def forward(self, idx):
        x = self.emb(idx)
        return self.head(x + self.mem(x)).logsumexp(-1).mean()


def _trained(sparse=False, steps=2, seed=0):
    torch.manual_seed(seed)
    m = Tiny(sparse=sparse)
    opt = build_optimizer(m, lr=1e-2, total_steps=10)
    for i in range(steps):
        opt.set_step(i)
        opt.zero_grad()
        m(torch.randint(0, 20, (2, 6))).backward()
        opt.step()
        m.mem.refresh_tucker()  # as the trainer does; loading refreshes u, t too
    return m, opt


@pytest.mark.parametrize("sparse", [False, True])
def test_round_trip_restores_everything(tmp_path, sparse):
    m, opt = _trained(sparse)
    sampler = {"epoch": 3, "pos": np.arange(5, dtype=np.int64), "order": torch.arange(4), "name": "facts"}
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    p = save_checkpoint(tmp_path, m, step=2, optimizer=opt, model_config={"dim": 16, "kinds": [1, 2]},
                        train_config={"lr": 0.01}, sampler_state=sampler, extra={"best": 1.5})
    expect = (random.random(), np.random.rand(), torch.rand(()))
    random.random(), np.random.rand(), torch.rand(3)  # disturb all RNGs

    m2 = Tiny(sparse=sparse)
    opt2 = build_optimizer(m2, lr=1e-2, total_steps=10)
    c = load_checkpoint(tmp_path, m2, opt2, expect_model_config={"dim": 16, "kinds": (1, 2)},
                        restore_rng=True)
    assert c.path == p and c.step == 2 and c.train_config == {"lr": 0.01} and c.extra == {"best": 1.5}
    assert (random.random(), np.random.rand(), torch.rand(())) == expect
    assert c.sampler_state["epoch"] == 3 and c.sampler_state["name"] == "facts"
    np.testing.assert_array_equal(c.sampler_state["pos"], np.arange(5))
    assert torch.equal(c.sampler_state["order"], torch.arange(4))
    for (n, a), b in zip(m.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    assert m2.head.weight is m2.emb.weight  # tying survives
    # identical optimiser state => identical next step
    for mm, oo in ((m, opt), (m2, opt2)):
        oo.set_step(2)
        oo.zero_grad()
        mm(torch.arange(12).reshape(2, 6) % 20).backward()
        oo.step()
    for a, b in zip(m.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert read_checkpoint_meta(tmp_path)["model_config"] == {"dim": 16, "kinds": [1, 2]}


def test_loading_never_unpickles(tmp_path, monkeypatch):
    m, opt = _trained()
    rng_at_save = torch.get_rng_state()
    save_checkpoint(tmp_path, m, optimizer=opt)

    def boom(*a, **k):
        raise AssertionError("pickle/torch.load used")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr("pickle.load", boom)
    monkeypatch.setattr("pickle.loads", boom)
    torch.manual_seed(99)  # a different model, optimiser and RNG state to load into
    fresh = Tiny()
    fresh_opt = build_optimizer(fresh, lr=1e-2)
    torch.rand(5)
    load_checkpoint(tmp_path, fresh, fresh_opt, restore_rng=True)
    # what was loaded is what was saved: weights, optimiser moments, and the global RNG
    for (name, a), b in zip(m.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    saved, loaded = opt.state_dict()["adamw"]["state"], fresh_opt.state_dict()["adamw"]["state"]
    assert saved.keys() == loaded.keys() and saved
    for k in saved:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(saved[k][name], loaded[k][name]), (k, name)
    assert torch.equal(torch.get_rng_state(), rng_at_save)


def test_failed_write_leaves_old_checkpoint_intact(tmp_path, monkeypatch):
    m, opt = _trained(steps=1)
    p = save_checkpoint(tmp_path, m, step=1, optimizer=opt)
    old = p.read_bytes()
    m2, opt2 = _trained(steps=3, seed=1)

    def crash(*a, **k):  # dies after the temp file is fully written, before the rename
        raise OSError("disk gone")

    monkeypatch.setattr(ckpt_mod.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        save_checkpoint(tmp_path, m2, step=3, optimizer=opt2)
    monkeypatch.undo()
    assert p.read_bytes() == old
    assert [q.name for q in tmp_path.iterdir()] == [p.name]  # temp file cleaned up
    assert load_checkpoint(p, Tiny()).step == 1

    real_open = builtins.open

    def crash_mid_write(*a, **k):  # safetensors writes through Rust; simulate a half-written temp
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod, "save_file", lambda t, f, metadata: (real_open(f, "wb").write(b"xx"),
                                                                         crash_mid_write()))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, m2, step=3)
    assert p.read_bytes() == old and len(list(tmp_path.iterdir())) == 1


def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    m, opt = _trained()
    p = save_checkpoint(tmp_path / "a", m, optimizer=opt)
    data = p.read_bytes()
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.safetensors.*(corrupt or truncated)"):
        load_checkpoint(bad, Tiny())
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="trunc.safetensors"):
        load_checkpoint(bad, Tiny())
    # flip one byte inside the tensor data (after the header): only the checksum can see it
    (header_len,) = struct.unpack("<Q", data[:8])
    flipped = bytearray(data)
    flipped[8 + header_len + 5] ^= 0xFF
    bad.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(bad, Tiny())
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope", Tiny())


def test_not_an_ultramem_checkpoint(tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(f))
    with pytest.raises(CheckpointError, match="plain.safetensors.*not an ultramem checkpoint"):
        load_checkpoint(f)


def test_mismatched_model_and_config(tmp_path):
    m, opt = _trained()
    save_checkpoint(tmp_path, m, optimizer=opt, model_config={"dim": 16, "ffn": "ultramem"})
    with pytest.raises(CheckpointError, match="model config: dim: checkpoint has 16, this run has 32"):
        load_checkpoint(tmp_path, expect_model_config={"dim": 32, "ffn": "ultramem"})
    with pytest.raises(CheckpointError, match=r"shape mismatch .*emb.weight: checkpoint \(20, 16\) vs model"):
        load_checkpoint(tmp_path, Tiny(vocab=24))

    class Extra(Tiny):
        def __init__(self):
            super().__init__()
            self.more = nn.Linear(2, 2)

    with pytest.raises(CheckpointError, match="missing keys more.weight"):
        load_checkpoint(tmp_path, Extra())
    with pytest.raises(CheckpointError, match="sparse"):  # optimiser built for the other value path
        t = Tiny(sparse=True)
        load_checkpoint(tmp_path, t, build_optimizer(t, lr=1e-2))


def test_unstorable_state_is_refused(tmp_path):
    m, _ = _trained(steps=0)
    with pytest.raises(CheckpointError, match="sampler.fn"):
        save_checkpoint(tmp_path, m, sampler_state={"fn": object()})
    assert not any(tmp_path.iterdir())


def test_metadata_is_plain_json(tmp_path):
    m, opt = _trained()
    p = save_checkpoint(tmp_path, m, optimizer=opt, step=5)
    (n,) = struct.unpack("<Q", p.read_bytes()[:8])
    header = json.loads(p.read_bytes()[8: 8 + n])
    state = json.loads(header["__metadata__"]["state"])
    assert state["step"] == 5 and "model/emb.weight" in header and "model/head.weight" not in header
