"""Bytes read by one decode step, counted from what the step actually touched; parameter counts.

Shape legend: N tokens in the step (batch * time), K entries per token (experts kept, or heads *
top-m value slots), E experts.

Rules (a "read" is one pass over a tensor's bytes; activations and the output are left out):
- dense weights (attention, norms, a dense FFN, MoE routers, the memory's W_q, keys, Tucker cores,
  norms, W_o, PKM sub-keys, a tied embedding that doubles as the output head): read once per step
  whatever the batch, because every token uses all of them;
- MoE experts: the weights of every distinct expert the step routes to, once each (a dropless
  grouped kernel streams each selected expert once however many tokens it serves);
- memory value tables: every distinct physical row the step reads, once each, full width (all MCS
  chunks of a row are pooled); for UltraMem also the `perm` entries of the distinct virtual slots;
- KV cache: each layer's cached keys and values for every sequence and position the new token
  attends to (positions = context + the new one).
Counting distinct rows/experts over the whole step is what separates the layers: B tokens route
to about E*(1-(1-k/E)^B) experts of millions of bytes each, but to at most B*H*m value rows of a
few hundred bytes each.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..ffn import MoE
from ..layers import PKMLayer, UltraMemLayer
from ..memory import MemoryLayer


def params_bytes(params: Iterable[torch.Tensor]) -> int:
    """Bytes of the given tensors, each counted once (shared parameters are not double-counted)."""
    seen = {id(p): p for p in params}
    return sum(p.numel() * p.element_size() for p in seen.values())


def moe_bytes(expert_tensors: Sequence[torch.Tensor], ids_NK: torch.Tensor,
              other: Iterable[torch.Tensor] = ()) -> dict:
    """Experts' weights are tensors whose leading dim is the expert; ids_NK are the routed experts."""
    per_expert = sum(t[0].numel() * t.element_size() for t in expert_tensors)
    distinct = int(torch.unique(ids_NK.reshape(-1)).numel())
    experts, dense = distinct * per_expert, params_bytes(other)
    return {"dense_weights": dense, "expert_weights": experts, "distinct_experts": distinct,
            "total": dense + experts}


def moe_layer_bytes(moe: MoE, ids_NK: torch.Tensor) -> dict:
    return moe_bytes(moe.expert_parameters(), ids_NK, moe.router.parameters())


def hf_moe_bytes(block: nn.Module, ids_NK: torch.Tensor) -> dict:
    """A Hugging Face sparse-MoE block (Mixtral / OLMoE): `experts.*` hold one slice per expert."""
    experts = list(block.experts.parameters())
    ids = {id(p) for p in experts}
    return moe_bytes(experts, ids_NK, (p for p in block.parameters() if id(p) not in ids))


def memory_rows(layer: MemoryLayer, idx: torch.Tensor) -> torch.Tensor:
    """Distinct physical value rows that the retrieved slots `idx` (any shape) read, sorted."""
    return torch.unique(layer.physical_rows(idx.reshape(-1)))


def memory_layer_bytes(layer: MemoryLayer, idx: torch.Tensor) -> dict:
    """Bytes of one memory layer for the retrieved slots `idx`: distinct rows + everything else."""
    # a row is read in every value tensor (UltraMemV2: its value and its pre-value)
    row_bytes = params_bytes(layer.value_parameters()) // layer.values.num_rows
    rows = int(memory_rows(layer, idx).numel())
    values = {id(p) for p in layer.value_parameters()}
    dense = params_bytes(p for p in layer.parameters() if id(p) not in values)
    index = layer.index_bytes(idx)
    return {"dense_weights": dense, "value_rows": rows * row_bytes, "distinct_rows": rows,
            "index": index, "total": dense + rows * row_bytes + index}


def kv_cache_bytes(n_layers: int, batch: int, positions: int, dim: int, element_size: int) -> int:
    """Keys and values read by attention for one new token per sequence over `positions`."""
    return 2 * n_layers * batch * positions * dim * element_size


class Recorder:
    """Records what a forward touched: MoE routings and memory retrievals, per module.

    Use as a context manager around one (untimed) forward, then `step_bytes(module)`:
        with Recorder(model) as rec:
            model(x)
        rec.step_bytes(model)
    Hooks are removed on exit; MoE.record_routing is restored.
    """

    def __init__(self, root: nn.Module):
        self.root = root
        self.routes: dict[int, torch.Tensor] = {}  # id(module) -> expert ids (N, K)
        self.slots: dict[int, list[torch.Tensor]] = {}  # id(memory layer) -> retrieved indices
        self._undo = []

    def __enter__(self) -> Recorder:
        for m in self.root.modules():
            if isinstance(m, MoE):
                self._undo.append(lambda m=m, old=m.record_routing: setattr(m, "record_routing", old))
                m.record_routing = True
                h = m.register_forward_hook(lambda mod, _i, _o: self.routes.__setitem__(
                    id(mod), mod.last_expert_ids))
                self._undo.append(h.remove)
            elif isinstance(m, MemoryLayer):
                h = m.register_retrieval_hook(self._slot_hook(id(m)))
                self._undo.append(h.remove)
            elif _is_hf_moe(m):
                h = m.gate.register_forward_hook(self._route_hook(id(m)))
                self._undo.append(h.remove)
        return self

    def _slot_hook(self, key: int):
        return lambda _layer, retrieved: self.slots.setdefault(key, []).append(retrieved.indices)

    def _route_hook(self, key: int):
        # HF routers return (logits, weights, expert ids)
        return lambda _mod, _inp, out: self.routes.__setitem__(key, out[2])

    def __exit__(self, *exc) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo = []

    def step_bytes(self, module: nn.Module) -> dict:
        """Bytes the recorded forward read in `module` (weights only; add the KV cache apart)."""
        out = {"dense_weights": 0, "expert_weights": 0, "value_rows": 0, "index": 0,
               "distinct_experts": 0, "distinct_rows": 0}
        sparse_ids: set[int] = set()
        for m in module.modules():
            part = None
            if isinstance(m, MoE) and id(m) in self.routes:
                part = moe_layer_bytes(m, self.routes[id(m)])
                sparse_ids |= {id(p) for p in m.expert_parameters()}
            elif _is_hf_moe(m) and id(m) in self.routes:
                part = hf_moe_bytes(m, self.routes[id(m)])
                sparse_ids |= {id(p) for p in m.experts.parameters()}
            elif isinstance(m, MemoryLayer) and id(m) in self.slots:
                part = memory_layer_bytes(m, torch.cat([i.reshape(-1) for i in self.slots[id(m)]]))
                sparse_ids |= {id(p) for p in m.value_parameters()}
            if part is not None:
                for k in ("expert_weights", "value_rows", "index", "distinct_experts", "distinct_rows"):
                    out[k] += part.get(k, 0)
        # Everything else (including the touched layers' own dense parts) is read once.
        out["dense_weights"] = params_bytes(p for p in module.parameters() if id(p) not in sparse_ids)
        out["total"] = out["dense_weights"] + out["expert_weights"] + out["value_rows"] + out["index"]
        return out


def _is_hf_moe(m: nn.Module) -> bool:
    return hasattr(m, "gate") and hasattr(m, "experts") and hasattr(m, "top_k")


# ------------------------------------------------------------------------------ parameter counts


def layer_param_counts(module: nn.Module) -> dict[str, int]:
    """total / sparse / activated-per-token parameter counts of an FFN-side block.

    Same definitions as `ultramem.counting` (for a whole LM): sparse = expert weights + value
    tables; activated = every other parameter + topk experts per MoE + heads*topk value rows per
    memory layer (keys are all scored for every token, so they count as activated).
    """
    sparse, active_sparse, sparse_ids = 0, 0, set()
    for m in module.modules():
        if isinstance(m, MoE):
            n = sum(p.numel() for p in m.expert_parameters())
            sparse, active_sparse = sparse + n, active_sparse + m.topk * n // m.num_experts
            sparse_ids |= {id(p) for p in m.expert_parameters()}
        elif _is_hf_moe(m):
            n = sum(p.numel() for p in m.experts.parameters())
            sparse, active_sparse = sparse + n, active_sparse + m.top_k * n // m.experts.num_experts
            sparse_ids |= {id(p) for p in m.experts.parameters()}
        elif isinstance(m, MemoryLayer):
            total_values, active_values = m.value_param_counts()
            sparse, active_sparse = sparse + total_values, active_sparse + active_values
            sparse_ids |= {id(p) for p in m.value_parameters()}
    dense = sum(p.numel() for p in {id(p): p for p in module.parameters()}.values()
                if id(p) not in sparse_ids)
    return {"total": dense + sparse, "sparse": sparse, "activated": dense + active_sparse}


# ------------------------------------------------------------------------------ matched sizes


def _quadratic(f, a: int):
    """Exact quadratic through f(a), f(a+1), f(a+2) (memory params are c0 + c1*n + c2*n^2)."""
    f0, f1, f2 = f(a), f(a + 1), f(a + 2)
    c2 = (f2 - 2 * f1 + f0) // 2
    c1 = f1 - f0 - c2 * (2 * a + 1)
    c0 = f0 - c1 * a - c2 * a * a
    return lambda n: c0 + c1 * n + c2 * n * n


def memory_counts(kind: str, dim: int, fields: dict):
    """n -> (total, activated) params of one memory layer with n keys per side, fitted on three tiny
    layers of the real class (so the sizing follows the layer code, not a copy of its formulas)."""
    from .. import PKMConfig, UltraMemConfig, UltraMemV2Config, UltraMemV2Layer

    def count(n):
        if kind == "ultramem_v2":
            return layer_param_counts(UltraMemV2Layer(UltraMemV2Config(dim=dim, num_keys=n, **fields)))
        if kind == "ultramem":
            return layer_param_counts(UltraMemLayer(UltraMemConfig(dim=dim, num_keys=n, **fields)))
        return layer_param_counts(PKMLayer(PKMConfig(dim=dim, num_keys=n, **fields)))
    a = max(8, fields.get("topk", 8))
    tot = _quadratic(lambda n: count(n)["total"], a)
    act = _quadratic(lambda n: count(n)["activated"], a)
    return lambda n: (tot(n), act(n))


def solve_increasing(f, target: int, multiple: int = 1) -> int:
    """The multiple of `multiple` (n >= 2) whose f(n) is closest to target, for an increasing f."""
    kmin = -(-2 // multiple)
    lo, hi = kmin, 2 * kmin
    while f(hi * multiple) < target:
        hi *= 2
    while lo < hi:  # smallest k with f(k * multiple) >= target
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if f(mid * multiple) < target else (lo, mid)
    if lo > kmin and abs(f((lo - 1) * multiple) - target) < abs(f(lo * multiple) - target):
        lo -= 1
    return lo * multiple


def moe_slot_counts(dim: int, hidden: int, experts: int, topk: int) -> tuple[int, int]:
    """(total, activated) params of one MoE FFN slot: SwiGLU experts (3*D*H each) + a D x E router."""
    per = 3 * dim * hidden
    return experts * per + dim * experts, topk * per + dim * experts


def match_memory(kind: str, dim: int, fields: dict, total: int, activated: int, mem_per_slot: float = 1.0,
                 ffn_hidden: int | None = None, multiple: int = 1) -> tuple[int, int]:
    """(num_keys n, narrow SwiGLU width w) so that one FFN slot, 3*D*w + f * memory(n) with f memory
    layers per block, has `total` params and (when w is free) `activated` params per token.

    total - activated does not depend on w: f * (values(n) - rows read per token) = total - activated
    fixes n, then w = (activated - f * activated_memory(n)) / (3*D). With ffn_hidden given (the
    sparse sweep keeps the dense part fixed), n matches the total only. n is a multiple of `multiple`.
    """
    counts = memory_counts(kind, dim, fields)
    if ffn_hidden is None:
        n = solve_increasing(lambda n: mem_per_slot * (counts(n)[0] - counts(n)[1]), total - activated,
                             multiple)
        w = round((activated - mem_per_slot * counts(n)[1]) / (3 * dim))
        if w < 1:
            raise ValueError(f"memory: {kind} alone exceeds the activated params to match ({activated})")
        return n, w
    n = solve_increasing(lambda n: 3 * dim * ffn_hidden + mem_per_slot * counts(n)[0], total, multiple)
    return n, ffn_hidden
