"""The memory-layer contract every memory layer implements, and the value-table factory.

A memory layer reads a block's normed hidden state x (B, T, D), retrieves a few value rows per
token from a large table and returns y (B, T, D_out) to add to the residual stream. Everything
outside the layers (the LM, the trainer, counting, diagnostics, the optimiser groups, the
benchmarks) talks to a memory layer only through `MemoryLayer`:

- `forward(x, state=None)`: `state` is whatever the layer carries between decode steps (the
  query-conv history of UltraMem); `new_state()` makes an empty one (None when nothing is carried);
- `retrieve(x, exact=False)` -> `Retrieved(indices, scores)`: the kept slots and their scores;
- `after_optimizer_step()`: called by the trainer once after every optimiser step (UltraMem
  recomputes its Tucker stage-1 vectors there; a no-op elsewhere);
- `aux_loss()`, `value_parameters()`, `memory_stats()`;
- `physical_rows(indices)`: retrieved slot ids -> the physical table rows they read;
- `rows_per_token`: slots read per token; `values`: the table (a `ValueTable` or a drop-in);
- `register_retrieval_hook(fn)`: fn(layer, retrieved) after every retrieval inside `forward`
  (what the benchmarks' byte accounting records).

The table is built by a `TableFactory` the layer receives (default `ValueTable`), so a sharded,
quantised or offloaded table plugs in without editing the layer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .values import ValueTable


class Retrieved(NamedTuple):
    """indices: (B, T, H, M) int64 slot ids (virtual slots for UltraMem); scores: (B, T, H, M, C)."""

    indices: torch.Tensor
    scores: torch.Tensor


class TableFactory(Protocol):
    """Builds a layer's value table: `num_rows` rows of width `dim`, pooled in `num_chunks` chunks."""

    def __call__(self, num_rows: int, dim: int, num_chunks: int = 1, sparse: bool = False,
                 lookup: str = "fused") -> nn.Module: ...


def default_table_factory(num_rows: int, dim: int, num_chunks: int = 1, sparse: bool = False,
                          lookup: str = "fused") -> ValueTable:
    return ValueTable(num_rows, dim, num_chunks, sparse=sparse, lookup=lookup)


class MemoryLayer(nn.Module):
    """Base class of the memory layers (`UltraMemLayer`, `PKMLayer`, ...): see the module doc."""

    cfg: object
    values: ValueTable

    def forward(self, x_BTD: torch.Tensor, state=None) -> torch.Tensor:
        raise NotImplementedError

    def retrieve(self, x_BTD: torch.Tensor, exact: bool = False) -> Retrieved:
        raise NotImplementedError

    def new_state(self):
        """An empty decode state for `forward(x, state)`; None when the layer carries nothing."""
        return None

    def after_optimizer_step(self) -> None:
        """Bring derived buffers up to date after the parameters changed (called by the trainer)."""

    def refresh_tucker(self) -> None:
        """UltraMem's Tucker refresh; a no-op for layers without Tucker cores (kept so model code
        can call it on any memory)."""

    def aux_loss(self) -> torch.Tensor:
        return self.values.weight.new_zeros(()) if hasattr(self.values, "weight") else torch.zeros(())

    def value_parameters(self) -> list[nn.Parameter]:
        """The value table's trainable tensors (their own optimiser group; SPEC section 4)."""
        return list(self.values.parameters())

    def physical_rows(self, indices: torch.Tensor) -> torch.Tensor:
        """Physical table rows (same shape) read by the retrieved slot ids `indices`."""
        return indices

    @property
    def rows_per_token(self) -> int:
        """Value slots read per token (heads * top-m)."""
        return self.cfg.heads * self.cfg.topk

    def value_param_counts(self) -> tuple[int, int]:
        """(total, activated per token) value parameters: the table once, and the rows a token
        reads at full row width (all chunks), for `counting.count_params`."""
        width = self.values.dim
        return self.values.num_rows * width, self.rows_per_token * width

    def index_bytes(self, indices: torch.Tensor) -> int:
        """Bytes of lookup tables read to map the distinct slots in `indices` to rows (0 here)."""
        return 0

    def memory_stats(self) -> dict[str, float]:
        """Layer-specific scalars for the run log (empty by default)."""
        return {}

    def register_retrieval_hook(self, fn: Callable[[MemoryLayer, Retrieved], None]) -> RemovableHandle:
        """Call fn(layer, retrieved) after each retrieval of `forward`; `.remove()` the handle."""
        if "_retrieval_hooks" not in self.__dict__:
            self._retrieval_hooks = OrderedDict()
        handle = RemovableHandle(self._retrieval_hooks)
        self._retrieval_hooks[handle.id] = fn
        return handle

    def _notify_retrieval(self, retrieved: Retrieved) -> None:
        for fn in self.__dict__.get("_retrieval_hooks", {}).values():
            fn(self, retrieved)


def memory_layers(module: nn.Module) -> list[MemoryLayer]:
    """Every memory layer inside `module` (itself included), in module order."""
    return [m for m in module.modules() if isinstance(m, MemoryLayer)]
