"""Differentiable collectives over a process group, and a count of the bytes each rank sends.

Thin autograd wrappers around torch.distributed's own collectives (no comm layer of our own):
`all_to_all` (all_to_all_single with uneven splits; its backward is the reverse all-to-all) and
`all_gather` (all_gather_single of equal-size pieces; its backward sends every rank's slice of
the gradient home and sums it: a reduce-scatter, written as an all-to-all because gloo has no
reduce_scatter). `bytes_sent()` is what this rank put on the wire in these calls (the payload
addressed to other ranks; copies to itself are not counted), for the benchmark and the cost model.

Shape legend: R rows of a message (first dim), any trailing dims travel with their row.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

_SENT = {"bytes": 0}


def bytes_sent() -> int:
    """Bytes this process has sent to other ranks through this module since `reset_bytes_sent`."""
    return _SENT["bytes"]


def reset_bytes_sent() -> None:
    _SENT["bytes"] = 0


def _row_bytes(x: torch.Tensor) -> int:
    return math.prod(x.shape[1:]) * x.element_size()


def all_to_all_raw(x_R: torch.Tensor, in_splits: list[int], out_splits: list[int], group) -> torch.Tensor:
    """Rows [sum(in_splits[:r]), ...) of x go to rank r; the result holds what each rank sent here."""
    me = dist.get_rank(group)
    out = x_R.new_empty((sum(out_splits),) + tuple(x_R.shape[1:]))
    dist.all_to_all_single(out, x_R.contiguous(), out_splits, in_splits, group=group)
    _SENT["bytes"] += (sum(in_splits) - in_splits[me]) * _row_bytes(x_R)
    return out


def all_gather_raw(x_R: torch.Tensor, group) -> torch.Tensor:
    """Every rank's x (equal shapes) stacked along dim 0 in rank order."""
    P = dist.get_world_size(group)
    out = x_R.new_empty((P * x_R.shape[0],) + tuple(x_R.shape[1:]))
    dist.all_gather_single(out, x_R.contiguous(), group=group)
    _SENT["bytes"] += (P - 1) * x_R.numel() * x_R.element_size()
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_R, in_splits, out_splits, group):
        ctx.splits, ctx.group = (in_splits, out_splits), group
        return all_to_all_raw(x_R, in_splits, out_splits, group)

    @staticmethod
    def backward(ctx, grad_R):
        in_splits, out_splits = ctx.splits
        return all_to_all_raw(grad_R, out_splits, in_splits, ctx.group), None, None, None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_R, group):
        ctx.group = group
        return all_gather_raw(x_R, group)

    @staticmethod
    def backward(ctx, grad_R):
        P = dist.get_world_size(ctx.group)
        piece = grad_R.shape[0] // P
        mine = all_to_all_raw(grad_R, [piece] * P, [piece] * P, ctx.group)
        return mine.view((P, piece) + tuple(grad_R.shape[1:])).sum(0), None


def all_to_all(x_R: torch.Tensor, in_splits: list[int], out_splits: list[int], group) -> torch.Tensor:
    """Differentiable `all_to_all_raw`."""
    return _AllToAll.apply(x_R, list(in_splits), list(out_splits), group)


def all_gather(x_R: torch.Tensor, group) -> torch.Tensor:
    """Differentiable `all_gather_raw` (backward: the summed gradient of this rank's piece)."""
    return _AllGather.apply(x_R, group)
