"""Registers the Triton kernels in `dispatch` for CUDA tensors, without importing Triton up front.

CUDA tensors run the Triton kernels when `triton` is importable (the `ultramem[triton]` extra),
else the torch paths; CPU tensors always run the torch paths (the kernels run on CPU only under
TRITON_INTERPRET=1, which the tests use through the modules' own functions). `force_reference()`
overrides both. The kernel modules are imported on first use, so `import ultramem` stays light.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from .dispatch import register


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def on_cuda_with_triton(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and triton_available()


def _pool(weight_NDc, row_TK, bag_TK, w_TKC, num_bags, sparse):
    from .triton_pool import pool_triton

    return pool_triton(weight_NDc, row_TK, bag_TK, w_TKC, num_bags, sparse)


def _stage1_topk(q_NSK, keys_SKJ, ut_SHR, m1, cache=None):
    from .triton_topk import stage1_topk_triton

    return stage1_topk_triton(q_NSK, keys_SKJ, ut_SHR, m1)


def _grid_topm(sr_XHRQ, sc_XHRQ, core_HRR, m):
    from .triton_topk import grid_topm_triton

    return grid_topm_triton(sr_XHRQ, sc_XHRQ, core_HRR, m)


register("pool", "triton", _pool, accepts=on_cuda_with_triton)
register("stage1_topk", "triton", _stage1_topk, accepts=on_cuda_with_triton)
register("grid_topm", "triton", _grid_topm, accepts=on_cuda_with_triton)
