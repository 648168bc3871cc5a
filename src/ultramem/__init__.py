"""ultramem: ultra-sparse memory layers (UltraMem, ICLR 2025) with PKM, dense and MoE baselines."""

from .config import PKMConfig, UltraMemConfig
from .diagnostics import retrieval_recall, used_rows
from .layers import PKMLayer, UltraMemLayer
from .retrieval import Retrieved
from .values import ValueTable

__all__ = [
    "PKMConfig",
    "PKMLayer",
    "Retrieved",
    "UltraMemConfig",
    "UltraMemLayer",
    "ValueTable",
    "retrieval_recall",
    "used_rows",
]
__version__ = "0.1.0"
