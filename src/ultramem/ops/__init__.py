"""Kernels of the memory layers, each with its torch reference beside it.

- `pool`: weighted sums of kept value rows per (token, bag, chunk) (`pooling.py`);
- `topk_indices`: top-k of long score rows (`topk.py`);
- `score_keys`: both sides' keys against the normed queries (`scoring.py`);
- `stage1_topk`, `grid_topm`: the two TDQKR search stages (`search.py`).

`dispatch.py` picks the implementation from the input's device and dtype; `force_reference()`
runs every op through its reference (for debugging a fast path). GPU kernels (Triton:
`triton_pool.py`, `triton_topk.py`) are registered for CUDA tensors by `triton_registry.py`
and imported on first use.
"""

from .dispatch import force_reference, implementations, register, select, set_force_reference
from .pooling import pool, pool_fused, pool_reference
from .scoring import score_keys, score_keys_bmm, score_keys_reference
from .search import grid_topm, grid_topm_reference, stage1_topk, stage1_topk_reference
from .topk import topk_blocked, topk_indices, topk_reference
from .triton_registry import triton_available

__all__ = [
    "force_reference",
    "grid_topm",
    "grid_topm_reference",
    "implementations",
    "pool",
    "pool_fused",
    "pool_reference",
    "register",
    "score_keys",
    "score_keys_bmm",
    "score_keys_reference",
    "select",
    "set_force_reference",
    "stage1_topk",
    "stage1_topk_reference",
    "topk_blocked",
    "topk_indices",
    "topk_reference",
    "triton_available",
]
