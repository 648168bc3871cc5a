"""Diagnostics of a memory layer: retrieval recall against the exact oracle, value-row usage."""

from __future__ import annotations

import torch

from .layers import PKMLayer, UltraMemLayer


@torch.no_grad()
def retrieval_recall(layer: UltraMemLayer | PKMLayer, x_BTD: torch.Tensor) -> float:
    """Mean fraction of the exact top-m slots (brute force over the grid) that the default
    retrieval also keeps, over tokens and heads. 1.0 means the fast search lost nothing."""
    fast = layer.retrieve(x_BTD).indices
    exact = layer.retrieve(x_BTD, exact=True).indices
    hits = (fast.unsqueeze(-1) == exact.unsqueeze(-2)).any(-1).float()
    return hits.mean().item()


@torch.no_grad()
def used_rows(layer: UltraMemLayer | PKMLayer, x_BTD: torch.Tensor) -> torch.Tensor:
    """Boolean mask (N,) of physical value rows read for the given inputs (for dead-row counts)."""
    idx = layer.retrieve(x_BTD).indices.reshape(-1)
    if isinstance(layer, UltraMemLayer):
        idx = layer.perm[idx] % layer.cfg.num_values
    mask = torch.zeros(layer.values.num_rows, dtype=torch.bool, device=idx.device)
    mask[idx] = True
    return mask
