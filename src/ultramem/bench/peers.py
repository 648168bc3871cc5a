"""The public peers the benchmarks compare against (`ultra-mem`, `product-key-memory`), and the
`Candidate` record every layer benchmark times. Optional: a peer that is not installed is skipped
with a note saying how to install it."""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .common import pkm_peer_rows_read

PEER_VERSIONS = {"ultra_mem": ("ultra-mem", "0.1.2"), "product_key_memory": ("product-key-memory", "0.3.0")}


@dataclass
class Candidate:
    name: str
    module: nn.Module
    call: Callable[[torch.Tensor], torch.Tensor]  # input (B, T, D) -> output tensor (B, T, D)
    config: dict
    value_params: list[nn.Parameter]  # the tables read row-sparsely; [] for the dense FFN
    rows_per_token: int  # value rows read per token (0 for the dense FFN)
    row_bytes: int
    distinct_rows: Callable[[torch.Tensor], int] | None  # rows read for an input (under no_grad)
    notes: list[str] = field(default_factory=list)

    @property
    def sparse_params(self) -> int:
        return sum(p.numel() for p in self.value_params)

    @property
    def fixed_bytes(self) -> int:
        ids = {id(p) for p in self.value_params}
        return sum(p.numel() * p.element_size() for p in self.module.parameters() if id(p) not in ids)

    def bytes_read(self, x: torch.Tensor) -> int:
        if self.distinct_rows is None:
            return self.fixed_bytes
        with torch.no_grad():
            self.module.eval()
            return self.distinct_rows(x) * self.row_bytes + self.fixed_bytes


def peer_version(module: str) -> tuple[bool, str]:
    dist, wanted = PEER_VERSIONS[module]
    try:
        importlib.import_module(module)
    except Exception as e:  # not installed, or its own dependencies missing (einops, einx, ...)
        return False, f"skipped: {dist} not importable ({type(e).__name__}: {e}); " \
                      f"pip install {dist}=={wanted} to compare"
    try:
        got = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        got = "unknown"
    note = f"{dist} {got}" + ("" if got == wanted else f" (benchmark written against {wanted})")
    return True, note


def peer_ultra_mem(dim: int, um: dict) -> Candidate:
    from ultra_mem import UltraMem

    # ultra-mem keeps num_memories / E rows per head (heads = cores, each with its own table) and
    # needs num_memories = k^2 with E | num_memories. k = 724 gives 2 x 131,044 rows of D_v.
    # Its query conv and input RMSNorm are off: our layer has neither (SPEC: no input norm).
    target = um["num_keys"] ** 2 * um["value_dim"]
    per_head = target / (um["heads"] * um["value_dim"])  # rows per head table
    k = round((per_head * um["value_expansion"]) ** 0.5)
    k += k % 2  # k^2 divisible by E = 4
    cfg = dict(dim=dim, dim_values=um["value_dim"], num_memories=k * k, topk=um["topk"],
               dim_queries_keys=um["key_dim"], core_rank=2, core_heads=um["heads"],
               value_expansion=um["value_expansion"], pre_query_causal_conv=False, prenorm=False)
    peer = UltraMem(**cfg)

    def rows(x: torch.Tensor) -> int:
        idx = peer(x)[1]  # (heads, B, T, topk) row ids into each head's own table
        heads = torch.arange(idx.shape[0]).view(-1, *([1] * (idx.ndim - 1)))
        return int((heads * peer.num_virtual_mems + idx).unique().numel())

    return Candidate("ultra_mem_peer", peer, lambda x: peer(x)[0], cfg, [peer.memories],
                     um["heads"] * um["topk"], um["value_dim"] * 4, rows)


def peer_pkm(dim: int, pkm: dict) -> Candidate:
    from product_key_memory import PKM

    cfg = dict(dim=dim, heads=pkm["heads"], num_keys=pkm["num_keys"], topk=pkm["topk"],
               dim_head=pkm["key_dim"] // 2)
    peer = PKM(**cfg)

    def rows(x: torch.Tensor) -> int:
        return pkm_peer_rows_read(peer, x)

    return Candidate("pkm_peer", peer, peer, cfg, [peer.values.weight], pkm["heads"] * pkm["topk"],
                     dim * 4, rows)
