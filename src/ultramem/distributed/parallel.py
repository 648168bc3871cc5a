"""`parallelize_memory`: shard, in place, the value table of every memory layer in a module."""

from __future__ import annotations

import logging

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..memory import memory_layers
from ..values import ValueTable
from .cost import choose_layout
from .mesh import mp_mesh
from .tables import DimShardedTable, RowShardedTable

log = logging.getLogger("ultramem.distributed")
TABLE_KINDS = {"dim": DimShardedTable, "row": RowShardedTable}


def _pick(layer, layout: str, P: int, tokens_per_step: int) -> str:
    if layout != "auto":
        return layout
    table = layer.values
    bags = getattr(layer.cfg, "value_expansion", 1)
    choice, cost = choose_layout(tokens_per_step, layer.rows_per_token, bags, table.num_chunks, table.dim, P)
    fits = {"dim": (table.dim // table.num_chunks) % P == 0, "row": table.num_rows % P == 0}
    if not fits[choice] and fits[{"dim": "row", "row": "dim"}[choice]]:
        choice = {"dim": "row", "row": "dim"}[choice]  # the cheaper one cannot split this table
    if not dist.is_initialized() or dist.get_rank() == 0:
        log.info("parallelize_memory: %s layout for %s (modelled bytes/rank/step at %d tokens: dim %.3g, "
                 "row %.3g)", choice, type(layer).__name__, tokens_per_step, cost["dim"], cost["row"])
    return choice


def parallelize_memory(module: nn.Module, mesh: DeviceMesh, layout: str = "auto",
                       tokens_per_step: int = 4096) -> nn.Module:
    """Replace the `ValueTable` of every memory layer in `module` (itself included) by a table
    sharded over the mesh's mp dimension that holds this rank's slice of the current weights.

    layout: "dim", "row" or "auto" (the cost model of `cost.py` at `tokens_per_step` tokens per
    rank picks, and logs its choice). Every rank must call it with identical weights (build the
    model with the same seed everywhere). Raises ValueError, before changing anything, when a
    table cannot be split (N or D_v / chunks not divisible by P). Returns `module`."""
    if layout not in ("auto", *TABLE_KINDS):
        raise ValueError(f"layout: must be one of ('auto', 'dim', 'row') (got {layout!r})")
    P = mp_mesh(mesh).size()
    new = []
    for layer in memory_layers(module):
        table = layer.values
        if not isinstance(table, ValueTable):
            raise ValueError(f"values: only a ValueTable can be sharded (got {type(table).__name__})")
        cls = TABLE_KINDS[_pick(layer, layout, P, tokens_per_step)]
        sharded = cls(table.num_rows, table.dim, table.num_chunks, mesh, lookup=table.lookup)
        sharded.load_full(table.weight.detach())
        sharded.train(table.training)
        new.append((layer, sharded))
    for layer, sharded in new:
        layer.values = sharded
    return module
