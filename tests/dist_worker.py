"""Checks run inside every rank of a `torchrun` job started by tests/test_distributed.py.

`python -m torch.distributed.run --standalone --nproc_per_node P tests/dist_worker.py CASE [ARGS]`
Each case raises (non-zero exit) on a mismatch; the test reads the exit code and the output.
The single-process reference is computed on every rank from the same seed (it is cheap here).

Shape legend: B batch, T time, D width, P ranks.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist

from ultramem import PKMConfig, PKMLayer, UltraMemConfig, UltraMemLayer, ValueTable
from ultramem.distributed import (
    DimShardedTable,
    RowShardedTable,
    init_distributed,
    init_mesh,
    parallelize_memory,
)

TOL = dict(atol=1e-5, rtol=1e-5)


def close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if got.shape != want.shape or not torch.allclose(got, want, **TOL):
        diff = (got - want).abs().max().item() if got.shape == want.shape else "shape"
        raise AssertionError(f"rank {dist.get_rank()}: {name} differs: {diff} {tuple(got.shape)} "
                             f"vs {tuple(want.shape)}")


class V2Pair(torch.nn.Module):
    """Two UltraMemV2 layers reading one shared pool (values and pre-values), outputs summed."""

    def __init__(self):
        super().__init__()
        from ultramem.v2 import UltraMemV2Config, build_layers

        self.cfg = UltraMemV2Config(dim=24, num_keys=4, key_dim=8, topk=6, value_dim=8, pre_value_dim=4,
                                    depth=2, share_group=2)
        self.layers = torch.nn.ModuleList(build_layers(self.cfg, 2))

    def value_parameters(self) -> list:
        return list({id(p): p for m in self.layers for p in m.value_parameters()}.values())

    def after_optimizer_step(self) -> None:
        for m in self.layers:
            m.after_optimizer_step()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[0](x) + self.layers[1](x)


def make_layer(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "v2":
        return V2Pair()
    if kind == "ultramem":
        return UltraMemLayer(UltraMemConfig(dim=24, num_keys=4, key_dim=8, value_dim=8, heads=2, topk=6,
                                            value_expansion=4))
    return PKMLayer(PKMConfig(dim=16, num_keys=8, key_dim=8, heads=2, topk=4, query_norm="layer"))


def my_slice(counts: list[int], rank: int) -> slice:
    start = sum(counts[:rank])
    return slice(start, start + counts[rank])


def dense_and_values(layer):
    vals = {id(p) for p in layer.value_parameters()}
    return [(n, p) for n, p in layer.named_parameters() if id(p) not in vals], layer.value_parameters()


def optimizer(layer):
    """AdamW; eps=1e-3 because Adam's first steps are ~lr * sign(g), and a gradient that is zero up
    to rounding (PKM's softmax makes some in its sub-keys) flips sign between two summation orders."""
    dense, values = dense_and_values(layer)
    return torch.optim.AdamW([{"params": [p for _, p in dense], "weight_decay": 0.1},
                              {"params": values, "weight_decay": 0.0}], lr=1e-2, eps=1e-3)


def case_equiv(kind: str, layout: str) -> None:
    """Outputs, input/dense/value grads and three AdamW steps equal the single-process layer's,
    with a different (uneven) number of sequences on every rank."""
    P, rank = dist.get_world_size(), dist.get_rank()
    ref = make_layer(kind)
    layer = copy.deepcopy(ref)
    parallelize_memory(layer, init_mesh(mp=P), layout=layout)
    assert all(t.layout == layout for _, t, _ in table_pairs(layer, ref))
    if kind == "v2":
        assert layer.layers[0].values is layer.layers[1].values, "the shared pool was split"
    counts = [1 + r % 2 for r in range(P)]
    torch.manual_seed(1)
    x_all = torch.randn(sum(counts), 5, layer.cfg.dim)
    g_all = torch.randn(sum(counts), 5, 16 if kind == "pkm" else layer.cfg.out_dim)
    sl = my_slice(counts, rank)
    opt_ref, opt = optimizer(ref), optimizer(layer)
    for step in range(4):
        xr = x_all.clone().requires_grad_(True)
        y_ref = ref(xr)
        (y_ref * g_all).sum().backward()
        x = x_all[sl].clone().requires_grad_(True)
        y = layer(x)
        (y * g_all[sl]).sum().backward()
        close(f"output step {step}", y, y_ref[sl])
        close(f"x.grad step {step}", x.grad, xr.grad[sl])
        check_grads(layer, ref)
        if step == 3:
            break
        for o, lay in ((opt_ref, ref), (opt, layer)):
            o.step()
            o.zero_grad()
            lay.after_optimizer_step()
    check_params(layer, ref)


def table_pairs(layer, ref) -> list:
    """(name, sharded table, reference table) for every distinct table (a shared pool once)."""
    from ultramem import memory_layers

    seen, out = set(), []
    for i, (mine, theirs) in enumerate(zip(memory_layers(layer), memory_layers(ref), strict=True)):
        for attr in ("values", "pre_values"):
            t = getattr(mine, attr, None)
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                out.append((f"layer {i} {attr}", t, getattr(theirs, attr)))
    return out


def check_grads(layer, ref) -> None:
    dense, _ = dense_and_values(layer)
    ref_params = dict(ref.named_parameters())
    for name, p in dense:
        dist.all_reduce(p.grad)  # what DDP does over the data-parallel ranks (a sum here)
        close(f"grad {name}", p.grad, ref_params[name].grad)
    for name, t, r in table_pairs(layer, ref):
        close(f"{name} grad shard", t.weight.grad.to_local(), t.local_slice(r.weight.grad))


def check_params(layer, ref) -> None:
    dense, _ = dense_and_values(layer)
    ref_params = dict(ref.named_parameters())
    for name, p in dense:
        close(f"param {name}", p.detach(), ref_params[name].detach())
    for name, t, r in table_pairs(layer, ref):
        close(f"{name} shard", t.weight.to_local(), t.local_slice(r.weight.detach()))
        close(f"{name} full table", t.full_weight(), r.weight.detach())


def case_pool(layout: str, skew: str) -> None:
    """table.pool against ValueTable.pool, forward and backward, for routed entries that are
    uniform, all on rank 0's rows ("skew"), with a rank holding no tokens at all ("empty")."""
    P, rank = dist.get_world_size(), dist.get_rank()
    N, dim, C, G, K = 8 * P, 4 * P, 2, 3, 5
    torch.manual_seed(2)
    ref = ValueTable(N, dim, C)
    ref.init_weights(1.0)
    cls = DimShardedTable if layout == "dim" else RowShardedTable
    table = cls(N, dim, C, init_mesh(mp=P))
    table.load_full(ref.weight.detach())
    counts = [0 if (skew == "empty" and r == 1) else 3 + 2 * r for r in range(P)]
    T = sum(counts)
    hi = N // P if skew == "skew" else N
    row, bag = torch.randint(0, hi, (T, K)), torch.randint(0, G, (T, K))
    w = torch.randn(T, K, C, requires_grad=True)
    g_out = torch.randn(T, G, dim)
    (ref.pool(row, bag, w, G) * g_out).sum().backward()
    sl = my_slice(counts, rank)
    w_mine = w.detach()[sl].clone().requires_grad_(True)
    out = table.pool(row[sl], bag[sl], w_mine, G)
    (out * g_out[sl]).sum().backward()
    close("pool output", out, ref.pool(row, bag, w.detach(), G)[sl])
    close("pool w grad", w_mine.grad, w.grad[sl])
    close("pool table grad", table.weight.grad.to_local(), table.local_slice(ref.weight.grad))


def case_errors() -> None:
    """Non-divisible shapes raise ValueError naming the field and P; nothing is replaced."""
    P = dist.get_world_size()
    mesh = init_mesh(mp=P)
    bad_dim = UltraMemLayer(UltraMemConfig(dim=24, num_keys=4, key_dim=8, value_dim=2 * (2 * P + 1),
                                           heads=2, topk=6))
    bad_rows = PKMLayer(PKMConfig(dim=16, num_keys=P + 1, key_dim=8, heads=2, topk=2, query_norm="none"))
    for layer, layout, field in ((bad_dim, "dim", "dim"), (bad_rows, "row", "num_rows")):
        before = layer.values
        try:
            parallelize_memory(layer, mesh, layout=layout)
        except ValueError as e:
            assert str(e).startswith(field) and f"mp={P}" in str(e), str(e)
            assert layer.values is before
        else:
            raise AssertionError(f"{layout}: no ValueError")


def case_memory() -> None:
    """The IVE permutation and the initial table are identical on every rank; the value weights
    and Adam state a rank holds are 1/P of the single-process figure."""
    P = dist.get_world_size()
    for layout in ("dim", "row"):
        layer = make_layer("ultramem", seed=3)
        perms = [torch.empty_like(layer.perm) for _ in range(P)]
        dist.all_gather(perms, layer.perm)
        assert all(torch.equal(p, perms[0]) for p in perms), "perm differs across ranks"
        full = layer.values.weight.numel()
        parallelize_memory(layer, init_mesh(mp=P), layout=layout)
        local = layer.values.weight.to_local()
        assert local.numel() * P == full, (local.numel(), full)
        opt = torch.optim.AdamW(layer.value_parameters(), lr=1e-3)
        layer(torch.randn(2, 3, 24)).sum().backward()
        opt.step()
        state = opt.state[layer.values.weight]
        assert state["exp_avg"].to_local().numel() * P == full


class TwoMemories(torch.nn.Module):
    """An UltraMem and a PKM layer side by side: a model with two sharded tables to checkpoint."""

    def __init__(self, seed: int):
        super().__init__()
        self.um, self.pkm = make_layer("ultramem", seed), make_layer("pkm", seed + 1)

    def value_parameters(self) -> list:
        return self.um.value_parameters() + self.pkm.value_parameters()

    def forward(self, x24: torch.Tensor, x16: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.um(x24).flatten(), self.pkm(x16).flatten()])


def probe(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        return model(torch.randn(2, 3, 24, generator=g), torch.randn(2, 3, 16, generator=g))


def case_dcp_save(folder: str, layout: str) -> None:
    """Shard, take one AdamW step, save model + optimizer with DCP; rank 0 writes the outputs."""
    from safetensors.torch import save_file

    from ultramem.distributed.checkpoint import save_dcp
    model = TwoMemories(seed=5)
    parallelize_memory(model, init_mesh(mp=dist.get_world_size()), layout=layout)
    opt = optimizer(model)
    model(torch.randn(2, 3, 24), torch.randn(2, 3, 16)).sum().backward()
    opt.step()
    model.um.after_optimizer_step()
    save_dcp(f"{folder}/ck", model, opt, step=1, model_config={"layout": layout})
    out = probe(model)  # a collective: every rank runs it
    if dist.get_rank() == 0:
        save_file({"out": out}, f"{folder}/expected.safetensors")


def case_dcp_load(folder: str, layout: str, name: str, with_optim: str) -> None:
    """A model built from another seed, sharded at this world size, loads the checkpoint and
    gives the saved outputs (the optimizer state too, resharded, when the checkpoint has it)."""
    from safetensors.torch import load_file

    from ultramem.distributed.checkpoint import load_dcp
    model = TwoMemories(seed=11)
    parallelize_memory(model, init_mesh(mp=dist.get_world_size()), layout=layout)
    opt = optimizer(model) if with_optim == "1" else None
    if opt is not None:  # DCP loads into existing optimizer state: take a zero-lr step first
        model(torch.randn(1, 2, 24), torch.randn(1, 2, 16)).sum().backward()
        opt.step()
        opt.zero_grad()
    meta = load_dcp(f"{folder}/{name}", model, opt)
    model.um.after_optimizer_step()
    close("output after load", probe(model), load_file(f"{folder}/expected.safetensors")["out"])
    assert meta["step"] == 1, meta
    if opt is not None:
        state = opt.state[model.um.values.weight]
        assert state["exp_avg"].to_local().shape == model.um.values.weight.to_local().shape
        assert float(state["step"]) == 1.0, state["step"]


def case_generate(layout: str) -> None:
    """Greedy decoding with the KV cache through a sharded table equals the unsharded model's;
    every rank decodes its own prompt (the same number of steps, no eos)."""
    from ultramem.model import LanguageModel, LMConfig

    torch.manual_seed(4)
    mem = {"num_keys": 8, "key_dim": 8, "value_dim": 16, "heads": 2, "topk": 4}
    ref = LanguageModel(LMConfig(vocab_size=50, dim=32, n_layers=2, n_heads=2, max_seq_len=32, ffn="ultramem",
                                 ffn_hidden=48, memory_placement="0:1", memory=mem))
    model = copy.deepcopy(ref)
    parallelize_memory(model, init_mesh(mp=dist.get_world_size()), layout=layout)
    prompt = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(dist.get_rank()))
    got = model.generate(prompt, 6, temperature=0.0)
    assert torch.equal(got, ref.generate(prompt, 6, temperature=0.0)), (got, dist.get_rank())


CASES = {"generate": case_generate, "equiv": case_equiv, "pool": case_pool, "errors": case_errors,
         "memory": case_memory, "dcp_save": case_dcp_save, "dcp_load": case_dcp_load}


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    init_distributed("gloo")
    try:
        for spec in argv:  # "equiv:ultramem:dim" runs case_equiv("ultramem", "dim")
            name, *args = spec.split(":")
            CASES[name](*args)
            dist.barrier()
            if dist.get_rank() == 0:
                print(f"ok {spec}", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
    # Skip interpreter teardown: gloo's threads sometimes abort there ("terminate called without
    # an active exception") after every check has passed and the group is destroyed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
