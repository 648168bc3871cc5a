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
TABLE_ATTRS = ("values", "pre_values")  # a layer's tables (V2 adds the pre-values)


def _shard(table: ValueTable, layout: str, mesh: DeviceMesh, P: int, auto: bool) -> nn.Module:
    """This rank's shard of `table`; under "auto" a table the layout cannot split takes the other."""
    fits = {"dim": (table.dim // table.num_chunks) % P == 0, "row": table.num_rows % P == 0}
    if auto and not fits[layout]:
        layout = {"dim": "row", "row": "dim"}[layout]
    sharded = TABLE_KINDS[layout](table.num_rows, table.dim, table.num_chunks, mesh, lookup=table.lookup)
    sharded.load_full(table.weight.detach())
    sharded.train(table.training)
    return sharded


def _pick(layer, layout: str, P: int, tokens_per_step: int) -> str:
    if layout != "auto":
        return layout
    table = layer.values
    bags = getattr(layer.cfg, "value_expansion", 1)
    choice, cost = choose_layout(tokens_per_step, layer.rows_per_token, bags, table.num_chunks, table.dim, P)
    if not dist.is_initialized() or dist.get_rank() == 0:
        log.info("parallelize_memory: %s layout for %s (modelled bytes/rank/step at %d tokens: dim %.3g, "
                 "row %.3g)", choice, type(layer).__name__, tokens_per_step, cost["dim"], cost["row"])
    return choice


def parallelize_memory(module: nn.Module, mesh: DeviceMesh, layout: str = "auto",
                       tokens_per_step: int = 4096) -> nn.Module:
    """Replace the `ValueTable`s of every memory layer in `module` (itself included: `values`, and
    V2's `pre_values`) by tables sharded over the mesh's mp dimension holding this rank's slice of
    the current weights; a pool shared by several layers stays shared.

    layout: "dim", "row" or "auto" (the cost model of `cost.py` at `tokens_per_step` tokens per
    rank picks, and logs its choice; a table it cannot split takes the other layout). Every rank
    must call it with identical weights (build the model with the same seed everywhere). Raises
    ValueError, before changing anything, when a table cannot be split (N or D_v / chunks not
    divisible by P). Returns `module`."""
    if layout not in ("auto", *TABLE_KINDS):
        raise ValueError(f"layout: must be one of ('auto', 'dim', 'row') (got {layout!r})")
    P = mp_mesh(mesh).size()
    sharded_of: dict[int, nn.Module] = {}  # a pool shared by several layers (V2) is sharded once
    plan = []
    for layer in memory_layers(module):
        chosen = None
        for attr in TABLE_ATTRS:
            table = getattr(layer, attr, None)
            if table is None:
                continue
            if id(table) not in sharded_of:
                if not isinstance(table, ValueTable):
                    raise ValueError(f"{attr}: only a ValueTable can be sharded (got {type(table).__name__})")
                chosen = chosen or _pick(layer, layout, P, tokens_per_step)
                sharded_of[id(table)] = _shard(table, chosen, mesh, P, layout == "auto")
            plan.append((layer, attr, sharded_of[id(table)]))
    for layer, attr, sharded in plan:
        setattr(layer, attr, sharded)
    return module
