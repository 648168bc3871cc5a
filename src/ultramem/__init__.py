"""ultramem: ultra-sparse memory layers (UltraMem, ICLR 2025) with PKM, dense and MoE baselines.

Shape suffixes on tensor names (`x_BTD`) use one letter for one thing across the package:
    B batch            T time / tokens (B*T when flattened)      D model width
    V vocabulary       H heads (attention, retrieval)            Dh head width
    L key positions in attention (cached + new)                  F FFN hidden width
    E experts (MoE)    A routed (token, expert) assignments      K kept entries per token
    M kept per retrieval head          R Tucker rank             C value chunks (MCS cores)
    G IVE blocks (the paper's value expansion E)                 N value-table rows
    P keys scored per side (n')        Q stage-1 candidates (m1) S the two key sides
    J scored key columns               X any leading dims        Dk key width, Dv value width
    Dc value chunk width (Dv / C)
A module may add local letters in its own legend; it does not reuse one of these for another thing.
"""

from .config import PKMConfig, UltraMemConfig
from .diagnostics import retrieval_recall, used_rows
from .layers import PKMLayer, UltraMemLayer
from .memory import MemoryLayer, Retrieved, TableFactory, memory_layers
from .offload import OffloadedValueTable, offload_values
from .quantized import QuantizedValueTable, load_quantized, quantize_values, save_quantized
from .v2 import UltraMemV2Config, UltraMemV2Layer
from .values import ValueTable

__all__ = [
    "MemoryLayer",
    "OffloadedValueTable",
    "PKMConfig",
    "PKMLayer",
    "QuantizedValueTable",
    "Retrieved",
    "TableFactory",
    "UltraMemConfig",
    "UltraMemLayer",
    "UltraMemV2Config",
    "UltraMemV2Layer",
    "ValueTable",
    "load_quantized",
    "memory_layers",
    "offload_values",
    "quantize_values",
    "retrieval_recall",
    "save_quantized",
    "used_rows",
]
__version__ = "0.1.0"
