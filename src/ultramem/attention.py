"""Causal self-attention with rotary positions and a KV cache for generation.

Shape legend (the package's, see `ultramem/__init__.py`): B batch, T new positions, L key
positions (cached + new), D model width, H heads, Dh head width (D / H).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def rotary_tables(head_dim: int, max_len: int, theta: float = 10000.0):
    """cos/sin tables (max_len, Dh/2) in fp32 for the rotate-half (GPT-NeoX) rotary variant."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x_BHTd: torch.Tensor, cos_Td: torch.Tensor, sin_Td: torch.Tensor) -> torch.Tensor:
    half = x_BHTd.shape[-1] // 2
    x1, x2 = x_BHTd[..., :half], x_BHTd[..., half:]
    cos, sin = cos_Td.to(x_BHTd.dtype), sin_Td.to(x_BHTd.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """Keys and values of every layer for `batch_size` sequences, up to `max_len` positions.

    `pos` is the number of positions already stored; the model advances it after each forward.
    Buffers are allocated on first use with the dtype/device of the keys (so autocast works).
    """

    def __init__(self, n_layers: int, batch_size: int, max_len: int):
        self.batch_size, self.max_len, self.pos = batch_size, max_len, 0
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.memory_state: dict[int, object] = {}  # per memory layer (query-conv inputs), set by the model

    def update(self, layer: int, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor):
        """Store the new keys/values at [pos, pos+T) and return all S = pos+T of them."""
        B, H, T, Dh = k_BHTd.shape
        if self.k[layer] is None:
            self.k[layer] = k_BHTd.new_zeros(B, H, self.max_len, Dh)
            self.v[layer] = v_BHTd.new_zeros(B, H, self.max_len, Dh)
        end = self.pos + T
        self.k[layer][:, :, self.pos:end] = k_BHTd
        self.v[layer][:, :, self.pos:end] = v_BHTd
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = n_heads, dim // n_heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x_BTD, cos_Td, sin_Td, kv_cache: KVCache | None = None, layer: int = 0):
        B, T, D = x_BTD.shape
        q, k, v = self.qkv(x_BTD).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos_Td, sin_Td), apply_rotary(k, cos_Td, sin_Td)
        past = 0
        if kv_cache is not None:
            past = kv_cache.pos
            k, v = kv_cache.update(layer, k, v)
        p = self.dropout if self.training else 0.0
        if past == 0 or T == 1:
            # Fresh sequence: plain causal mask. One new token: it may see every cached position.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=past == 0 and T > 1)
        else:
            # Several new tokens after a prefix: SDPA's is_causal is top-left aligned, so build the
            # bottom-right aligned mask (new token i sees positions <= past + i).
            L = past + T
            mask_TL = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_TL, dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))
