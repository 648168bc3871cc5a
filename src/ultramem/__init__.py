"""ultramem: ultra-sparse memory layers (UltraMem, ICLR 2025) with PKM, dense and MoE baselines."""

from .config import PKMConfig, UltraMemConfig
from .diagnostics import retrieval_recall, used_rows
from .layers import PKMLayer, UltraMemLayer
from .memory import MemoryLayer, Retrieved, TableFactory, memory_layers
from .values import ValueTable

__all__ = [
    "MemoryLayer",
    "PKMConfig",
    "PKMLayer",
    "Retrieved",
    "TableFactory",
    "UltraMemConfig",
    "UltraMemLayer",
    "ValueTable",
    "memory_layers",
    "retrieval_recall",
    "used_rows",
]
__version__ = "0.1.0"
