"""Quantised value tables for serving: int8 / 4-bit row-wise (PyTorch's quantised embedding-bag
operators) and fp8 (float8_e4m3fn with one scale per row). Inference only.

A `QuantizedValueTable` is a drop-in for `ValueTable` (`pool`, `num_rows`, `dim`, `num_chunks`):
`quantize_values(model, "int8")` swaps every memory layer's table for one in place. The table is
stored as (rows * C, Dv / C) like `ValueTable`, and every storage row (one chunk of one physical row)
is quantised with its own scale and offset, so an MCS chunk never shares a scale with another.

Packed row formats (those of `torch.ops.quantized.embedding_bag_*_prepack`):
    int8  Dc uint8 codes, then fp32 scale and fp32 bias                          (Dc + 8 bytes)
    int4  Dc / 2 bytes (two codes each, low nibble first), fp16 scale, fp16 bias  (Dc / 2 + 4)
    fp8   Dc float8_e4m3fn values in `packed`, fp32 scale in `scale`              (Dc + 4)
On CPU int8 / int4 pool with the fused quantised embedding-bag operators; elsewhere (and fp8
everywhere) the distinct rows read are dequantised into a small dense table and pooled
(`ops.pooling.pool_gathered`). `save_quantized` / `load_quantized` write / read a quantised
LanguageModel as one safetensors file (no pickle).

Shape legend (the package's, see `ultramem/__init__.py`, plus local letters): T tokens, K kept
entries per token, G bags per token (IVE blocks), C chunks, N storage rows (value rows * C);
local: Dc chunk width (Dv / C), U distinct storage rows read, Y bytes (fp8: entries) of a packed row.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .memory import MemoryLayer
from .ops import dispatch
from .ops.pooling import bag_layout, pool_gathered, unbag

KINDS = ("int8", "int4", "fp8")
FORMAT = "ultramem-quantized"
VERSION = 1
_FP8 = torch.float8_e4m3fn
_TRAIN_ERROR = ("quantised tables are inference-only: call model.eval() or run under torch.no_grad(); "
                "train the full-precision model and call quantize_values afterwards")

__all__ = ["KINDS", "QuantizedValueTable", "load_quantized", "quantize_values", "save_quantized"]


# ---------------------------------------------------------------- row formats

def packed_width(kind: str, width: int) -> int:
    """Bytes (elements for fp8) of one packed storage row of `width` values."""
    return {"int8": width + 8, "int4": width // 2 + 4, "fp8": width}[kind]


def _reinterpret(tail_UY: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Trailing bytes of packed rows read as `dtype` (a fresh copy: the view needs alignment)."""
    return tail_UY.reshape(-1).clone().view(dtype).view(tail_UY.shape[0], -1)


def dequantize_rows(packed_UY: torch.Tensor, kind: str, width: int,
                    scale_U: torch.Tensor | None = None) -> torch.Tensor:
    """Packed rows -> (U, width) fp32 in plain torch ops (any device; the gathered path)."""
    if kind == "fp8":
        return packed_UY.float() * scale_U.unsqueeze(-1)
    if kind == "int8":
        codes_UDc = packed_UY[:, :width].float()
        tail = _reinterpret(packed_UY[:, width:], torch.float32)
    else:
        half = packed_UY[:, : width // 2]
        codes_UDc = torch.stack([half & 15, half >> 4], dim=-1).reshape(-1, width).float()
        tail = _reinterpret(packed_UY[:, width // 2:], torch.float16).float()
    return codes_UDc * tail[:, :1] + tail[:, 1:2]


def quantize_rows(weight_NDc: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, Dc) float table -> (packed, scale or None), on the table's device."""
    w = weight_NDc.detach().float()
    if kind == "fp8":
        scale_N = (w.abs().amax(dim=1) / torch.finfo(_FP8).max).clamp_min(1e-12)
        return (w / scale_N.unsqueeze(-1)).to(_FP8), scale_N
    prepack = (torch.ops.quantized.embedding_bag_byte_prepack if kind == "int8"
               else torch.ops.quantized.embedding_bag_4bit_prepack)
    return prepack(w.cpu()).to(w.device), None


# ---------------------------------------------------------------- pooling ops (ops.dispatch)

def _pool_dequant(kind: str):
    def fn(packed_NY, row_TK, bag_TK, w_TKC, num_bags, width):
        return pool_gathered(lambda u: dequantize_rows(packed_NY.index_select(0, u), kind, width),
                             row_TK, bag_TK, w_TKC, num_bags)
    return fn


def _pool_op(op):
    def fn(packed_NY, row_TK, bag_TK, w_TKC, num_bags, width):
        T, C = row_TK.shape[0], w_TKC.shape[-1]
        idx, offsets, psw, G = bag_layout(row_TK, bag_TK, w_TKC.float(), num_bags)
        out = op(packed_NY, idx, offsets, False, 0, False, psw)
        return unbag(out, T, C, G)
    return fn


_CPU = lambda t: t.device.type == "cpu"  # noqa: E731  (the fused quantised kernels are CPU-only)
for _kind, _op in (("int8", torch.ops.quantized.embedding_bag_byte_rowwise_offsets),
                   ("int4", torch.ops.quantized.embedding_bag_4bit_rowwise_offsets)):
    dispatch.register(f"pool_{_kind}", "dequantize_gathered", _pool_dequant(_kind), reference=True)
    dispatch.register(f"pool_{_kind}", "quantized_embedding_bag", _pool_op(_op), accepts=_CPU)


# ---------------------------------------------------------------- the table

class QuantizedValueTable(nn.Module):
    """A value table of `num_rows` rows of width `dim` (read in `num_chunks` chunks), quantised
    row-wise to `kind` ("int8", "int4" or "fp8"). Inference only: it holds no parameter."""

    def __init__(self, num_rows: int, dim: int, num_chunks: int = 1, kind: str = "int8"):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"dtype: must be one of {KINDS} (got {kind!r})")
        if dim % num_chunks:
            raise ValueError(f"dim: must be divisible by num_chunks={num_chunks} (got {dim})")
        width = dim // num_chunks
        if kind == "int4" and width % 2:
            raise ValueError(f"dim: int4 needs an even chunk width dim / num_chunks (got {width})")
        self.num_rows, self.dim, self.num_chunks = num_rows, dim, num_chunks
        self.chunk_dim, self.kind = width, kind
        self.sparse, self.lookup, self.read_counts = False, "fused", None  # ValueTable's attributes
        N = num_rows * num_chunks
        if kind == "fp8":
            self.register_buffer("packed", torch.zeros(N, width, dtype=_FP8))
            self.register_buffer("scale", torch.ones(N))
        else:
            self.register_buffer("packed", torch.zeros(N, packed_width(kind, width), dtype=torch.uint8))
            self.scale = None

    @classmethod
    def from_table(cls, table: nn.Module, kind: str) -> QuantizedValueTable:
        """Quantise a `ValueTable` (anything with an (N, Dc) `weight`), on its device."""
        q = cls(table.num_rows, table.dim, table.num_chunks, kind)
        packed, scale = quantize_rows(table.weight, kind)
        q.packed = packed
        if scale is not None:
            q.scale = scale
        return q

    def bytes_per_row(self) -> int:
        """Bytes read per physical row (all chunks, scales included)."""
        per_chunk = packed_width(self.kind, self.chunk_dim) + (4 if self.kind == "fp8" else 0)
        return self.num_chunks * per_chunk

    def dequantize(self) -> torch.Tensor:
        """The whole table as (N, Dc) fp32 (what the lookups compute with; for tests)."""
        if self.packed.device.type == "cpu" and self.kind != "fp8":
            unpack = (torch.ops.quantized.embedding_bag_byte_unpack if self.kind == "int8"
                      else torch.ops.quantized.embedding_bag_4bit_unpack)
            return unpack(self.packed)
        return dequantize_rows(self.packed, self.kind, self.chunk_dim, self.scale)

    def rows(self) -> torch.Tensor:
        return self.dequantize().view(self.num_rows, self.dim)

    def init_weights(self, std: float) -> None:
        raise RuntimeError(f"init_weights: {_TRAIN_ERROR}")

    def pool(self, row_TK: torch.Tensor, bag_TK: torch.Tensor | None, w_TKC: torch.Tensor,
             num_bags: int = 1, impl: str | None = None) -> torch.Tensor:
        """Weighted sums of kept rows per (token, bag, chunk) -> (T, num_bags, dim) fp32."""
        if self.training and torch.is_grad_enabled():
            raise RuntimeError(_TRAIN_ERROR)
        if self.kind == "fp8":
            # the per-row scale rides on the entry weights: one conversion pass over the rows read
            out = pool_gathered(lambda u: self.packed.index_select(0, u).float(), row_TK, bag_TK, w_TKC,
                                num_bags, row_scale_N=self.scale)
        else:
            op = f"pool_{self.kind}"
            fn = dispatch.implementations(op)["dequantize_gathered"] if impl == "reference" else \
                dispatch.select(op, self.packed).fn
            out = fn(self.packed, row_TK, bag_TK, w_TKC, num_bags, self.chunk_dim)
        return out.reshape(row_TK.shape[0], num_bags, self.dim)

    def extra_repr(self) -> str:
        return f"rows={self.num_rows}, dim={self.dim}, chunks={self.num_chunks}, kind={self.kind}"


# ---------------------------------------------------------------- model level

def _named_memory_layers(model: nn.Module) -> list[tuple[str, MemoryLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MemoryLayer)]


def quantize_values(model: nn.Module, dtype: str = "int8") -> nn.Module:
    """Replace every memory layer's value table by a `QuantizedValueTable` of `dtype`, in place
    (on the table's device). Returns the model. The model can no longer train its tables."""
    if dtype not in KINDS:
        raise ValueError(f"dtype: must be one of {KINDS} (got {dtype!r})")
    layers = _named_memory_layers(model)
    if not layers:
        raise ValueError(f"model: has no memory layer to quantise (got {type(model).__name__})")
    for name, layer in layers:
        if not isinstance(getattr(layer.values, "weight", None), torch.Tensor):
            raise ValueError(f"{name or 'model'}.values: expected a full-precision table with a "
                             f"`weight` (got {type(layer.values).__name__})")
        layer.values = QuantizedValueTable.from_table(layer.values, dtype)
    return model


def save_quantized(model: nn.Module, path) -> Path:
    """Write a quantised `LanguageModel` (weights, packed tables, config) to one safetensors file."""
    from .checkpoint import _model_tensors, atomic_save_file

    cfg = getattr(model, "cfg", None)
    if not hasattr(cfg, "to_dict"):
        raise ValueError(f"model: save_quantized needs a LanguageModel with a cfg "
                         f"(got {type(model).__name__})")
    tables = {name: {"kind": layer.values.kind} for name, layer in _named_memory_layers(model)
              if isinstance(layer.values, QuantizedValueTable)}
    if not tables:
        raise ValueError("model: no quantised table; call quantize_values(model, dtype) first")
    tensors: dict[str, torch.Tensor] = {}
    aliases = _model_tensors(model, tensors)
    tensors = {k.removeprefix("model/"): v.cpu() for k, v in tensors.items()}
    meta = {"format": FORMAT, "version": str(VERSION), "model_config": json.dumps(cfg.to_dict()),
            "tables": json.dumps(tables), "aliases": json.dumps(aliases)}
    path = Path(path)
    atomic_save_file(tensors, meta, path)
    return path


def load_quantized(path, device: str = "cpu") -> nn.Module:
    """The `LanguageModel` written by `save_quantized`, in eval mode on `device`."""
    from .model import LanguageModel, LMConfig

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own types for missing / bad files
        raise ValueError(f"{path}: not a readable safetensors file: {e}") from e
    if meta.get("format") != FORMAT or meta.get("version") != str(VERSION):
        raise ValueError(f"{path}: not an ultramem quantised model v{VERSION} "
                         f"(format={meta.get('format')!r}, version={meta.get('version')!r})")
    model = LanguageModel(LMConfig.from_dict(json.loads(meta["model_config"])))
    for name, spec in json.loads(meta["tables"]).items():
        layer = model.get_submodule(name)
        old = layer.values
        layer.values = QuantizedValueTable(old.num_rows, old.dim, old.num_chunks, spec["kind"])
    for name, target in json.loads(meta["aliases"]).items():
        state[name] = state[target]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: tensors do not fit the saved model config: {e}") from e
    return model.to(device).eval()
