"""Kernels of the memory layers, each with its torch reference beside it.

- `pool`: weighted sums of kept value rows per (token, bag, chunk) (`pooling.py`);
- `topk_indices`: top-k of long score rows (`topk.py`);
- `score_keys`: both sides' keys against the normed queries (`scoring.py`).

`dispatch.py` picks the implementation from the input's device and dtype; `force_reference()`
runs every op through its reference (for debugging a fast path). GPU kernels (Triton) register
themselves there when importable.
"""

from .dispatch import force_reference, implementations, register, select, set_force_reference
from .pooling import pool, pool_fused, pool_reference
from .scoring import score_keys, score_keys_bmm, score_keys_reference
from .topk import topk_blocked, topk_indices, topk_reference

__all__ = [
    "force_reference",
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
    "topk_blocked",
    "topk_indices",
    "topk_reference",
]
