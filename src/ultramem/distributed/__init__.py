"""Memory layers across processes on torch.distributed: meshes, sharded value tables, checkpoints.

    mesh = init_mesh(dp=1, mp=2)                 # torchrun --nproc_per_node 2 ...
    parallelize_memory(model, mesh, layout="auto")

See README "Scaling past one machine" and SPEC section 8.
"""

from .comm import bytes_sent, reset_bytes_sent
from .cost import choose_layout, comm_bytes, spec_bytes
from .mesh import init_distributed, init_mesh, mp_mesh
from .parallel import parallelize_memory
from .tables import DimShardedTable, RowShardedTable

__all__ = [
    "DimShardedTable",
    "RowShardedTable",
    "bytes_sent",
    "choose_layout",
    "comm_bytes",
    "init_distributed",
    "init_mesh",
    "mp_mesh",
    "parallelize_memory",
    "reset_bytes_sent",
    "spec_bytes",
]
