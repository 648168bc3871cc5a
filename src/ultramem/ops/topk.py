"""Top-k indices of each row: `torch.topk` (the reference) and an exact blocked search for CPU.

Shape legend: X any leading dims (rows), L row length, S block count, K kept.
"""

from __future__ import annotations

import functools

import torch

from .dispatch import register, select

# Cost model of torch's CPU topk, for `topk_plan` (measured on a 2-core EPYC VM, torch 2.13):
# ~10 ns per entry nearly whatever the row length (branch misses dominate), ~60 us of fixed cost
# for one level of the blocked search (about six small ops), and rows split over threads in tasks
# of at least GRAIN entries (at::internal::GRAIN_SIZE), so short rows parallelise only in bulk.
TOPK_NS_PER_ENTRY = 10.0
TOPK_NS_PER_LEVEL = 60_000.0
TOPK_GRAIN = 32768


def topk_reference(x_XL: torch.Tensor, k: int, sorted: bool) -> torch.Tensor:
    return x_XL.topk(k, dim=-1, sorted=sorted).indices


def topk_blocked(x_XL: torch.Tensor, k: int, sorted: bool) -> torch.Tensor:
    """Indices of the k largest entries of each row (the same set as `torch.topk`, ties aside).

    CPU `topk` costs ~10 ns per entry, so long rows go through blocks: cut a row into L/w blocks
    (block j = entries j, j + L/w, ...; strided, so the block maxima are w contiguous vector
    maxima). An entry of the row's top k lies in a block whose maximum is among the k largest
    block maxima - else k other blocks, each holding an entry at least as large, would outrank
    it. So: top k of the block maxima (recursively), then top k of the k*w entries of those
    blocks. `topk_plan` picks the widths. L = 1024, k = 32, one thread: 1024 -> 512 -> 128
    maxima, topk over 128, 128 and 64 entries instead of 1024 (~2x faster).
    """
    L = x_XL.shape[-1]
    if x_XL.numel() == 0:
        return topk_reference(x_XL, k, sorted)
    _, plan = topk_plan(L, k, x_XL.numel() // L, torch.get_num_threads())
    return blocked_topk(x_XL, k, sorted, plan)


def blocked_topk(x_XL: torch.Tensor, k: int, sorted: bool, widths: tuple[int, ...]) -> torch.Tensor:
    """The blocked search with explicit block widths (outermost first; () = plain topk)."""
    if not widths:
        return x_XL.topk(k, dim=-1, sorted=sorted).indices
    L, w = x_XL.shape[-1], widths[0]
    S = L // w
    block_max_XS = x_XL.unflatten(-1, (w, S)).amax(-2)
    blocks_XK = blocked_topk(block_max_XS, k, False, widths[1:])
    starts_W1 = torch.arange(0, L, S, device=x_XL.device).unsqueeze(-1)
    cand_XC = (blocks_XK.unsqueeze(-2) + starts_W1).flatten(-2)
    best_XK = x_XL.gather(-1, cand_XC).topk(k, dim=-1, sorted=sorted).indices
    return cand_XC.gather(-1, best_XK)


@functools.lru_cache(maxsize=512)
def topk_plan(L: int, k: int, rows: int, threads: int) -> tuple[float, tuple[int, ...]]:
    """(estimated ns, block widths outermost first) of the cheapest blocked top-k of `rows` rows.

    A plain topk over n entries a row runs in min(threads, ceil(rows / (GRAIN // n))) tasks, so
    with two threads and 256 rows, 1024 -> 256 maxima (256 entries a row parallelise) beats
    1024 -> 512 -> 128 (128 entries do not) although it sorts through more entries."""

    def plain(n: int) -> float:
        tasks = min(threads, -(-rows // max(1, TOPK_GRAIN // n)))
        return rows * n * TOPK_NS_PER_ENTRY / tasks

    best = (plain(L), ())
    for w in (2, 4, 8, 16, 32):
        if L % w or L // w < k or k * w >= L:
            continue
        sub_cost, sub_widths = topk_plan(L // w, k, rows, threads)
        cost = plain(k * w) + sub_cost + TOPK_NS_PER_LEVEL
        if cost < best[0]:
            best = (cost, (w, *sub_widths))
    return best


register("topk", "reference", topk_reference, reference=True)
# A GPU topk has no such per-entry cost: the blocked search is a CPU path only.
register("topk", "blocked", topk_blocked, accepts=lambda t: t.device.type == "cpu")


def topk_indices(x_XL: torch.Tensor, k: int, sorted: bool = True) -> torch.Tensor:
    """Indices (..., k) of the k largest entries of each row of x_XL."""
    return select("topk", x_XL).fn(x_XL, k, sorted)
