"""Value tables that live on disk (a memory-mapped safetensors file) or in (pinned) host memory.

A decode step reads a few dozen rows per token, so the table need not be in RAM or on the GPU:
- where="disk": the file is memory-mapped; a CPU lookup runs `embedding_bag` straight on the
  mapping, which touches only the pages of the rows read. The mapping is advised MADV_RANDOM
  and the file's unmapped page cache is dropped when it is opened: the kernel maps a whole cached
  folio on a fault (up to 2 MB for a file cached by a big sequential write or readahead), so
  without both every row read would pull megabytes into RSS (measured: ~2 MB per row read on
  Linux 6.18). With them RSS grows with the distinct rows read: about a page per row while
  the file is mostly uncached, more once much of it is cached (the kernel's fault-around maps
  cached neighbouring pages too). `release()` unmaps what was touched (the pages stay in the page cache);
  map_budget_mb makes it happen by itself when the touched pages may exceed that budget
  (`MapBudget`). Off by default: a budget near what one step maps makes every step re-fault its
  rows (measured 4-29x slower lookups at B >= 16 with a 256 MB budget on a 368 MB table).
- where="host": the table is read into host memory, pinned when CUDA is available.
For indices on another device (CUDA) only the distinct rows read are gathered on the host into
a (pinned) staging tensor and copied to the device (`ops.pooling.pool_gathered`); the same path
runs on CPU with `staged=True` (how the tests check it without a GPU).

Files are plain safetensors with one tensor "weight" of shape (N, Dc), written chunk by
chunk (`write_table_file`), so a table larger than RAM can be generated; a file that is
truncated, or whose shape or dtype does not fit the layer, is refused with a ValueError naming it.

Shape legend (the package's, see `ultramem/__init__.py`, plus local letters): T tokens, K kept
entries per token, G bags per token (IVE blocks), C chunks, N storage rows (value rows * C);
local: Dc chunk width (Dv / C), U distinct storage rows read.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .memory import MemoryLayer
from .ops.pooling import pool_fused, pool_gathered

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
WHERE = ("disk", "host")
TENSOR = "weight"
_TRAIN_ERROR = ("offloaded tables are inference-only: call model.eval() or run under torch.no_grad(); "
                "train an in-memory table and call offload_values afterwards")

__all__ = ["OffloadedValueTable", "offload_values", "read_table_header", "write_table_file"]


# ---------------------------------------------------------------- the file

def _dtype_name(dtype: torch.dtype) -> str:
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"dtype: offloaded tables hold one of {list(DTYPES.values())} (got {dtype})")


def write_table_file(path, shape: tuple[int, int], dtype: torch.dtype, chunks: Iterable[torch.Tensor],
                     metadata: dict[str, str] | None = None) -> Path:
    """Stream a safetensors file with one tensor "weight" of `shape` from consecutive row blocks
    (never the whole table in memory); atomic (temp file + rename); drops its page cache after."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = shape[0] * shape[1] * itemsize
    header = {TENSOR: {"dtype": _dtype_name(dtype), "shape": list(shape), "data_offsets": [0, nbytes]},
              "__metadata__": dict(metadata or {})}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % mmap.PAGESIZE)  # data page-aligned: a row spans fewest pages
    tmp = path.with_name(f".{path.name}.tmp")
    written = 0
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for block in chunks:
                block = block.detach().to("cpu", dtype).contiguous()
                if block.ndim != 2 or block.shape[1] != shape[1]:
                    raise ValueError(f"chunks: expected blocks of shape (*, {shape[1]}) "
                                     f"(got {tuple(block.shape)})")
                f.write(memoryview(block.view(torch.uint8).numpy()))
                written += block.numel() * itemsize
            if written != nbytes:
                raise ValueError(f"chunks: gave {written} bytes, shape {shape} needs {nbytes}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_table_header(path) -> tuple[torch.dtype, tuple[int, int], int, dict]:
    """(dtype, shape, byte offset of the data, metadata) of a table file; ValueError naming the
    file when it is missing, not safetensors, has no 2-D "weight" or is shorter than its header says."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (hlen,) = struct.unpack("<Q", f.read(8))
            if hlen > size - 8:
                raise ValueError(f"header length {hlen} exceeds the file")
            header = json.loads(f.read(hlen))
        spec = header[TENSOR]
        dtype, shape, (begin, end) = DTYPES[spec["dtype"]], tuple(spec["shape"]), spec["data_offsets"]
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise ValueError(f"{path}: not a value-table safetensors file with a '{TENSOR}' tensor "
                         f"of dtype {list(DTYPES)}: {e}") from e
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(shape) != 2 or end - begin != shape[0] * shape[1] * itemsize:
        raise ValueError(f"{path}: '{TENSOR}' must be 2-D with {itemsize}-byte entries "
                         f"(got shape {list(shape)}, {end - begin} bytes)")
    start = 8 + hlen + begin
    if size < start + (end - begin):
        raise ValueError(f"{path}: truncated: {size} bytes, the header needs {start + end - begin}")
    return dtype, shape, start, header.get("__metadata__", {})


def drop_page_cache(path) -> None:
    """Evict the file's unmapped cached pages: a later fault then caches (and maps) one page per
    row instead of the large folios a sequential write or read left behind (see the module doc)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def map_table(path, dtype: torch.dtype, shape: tuple[int, int], start: int) -> tuple[torch.Tensor, mmap.mmap]:
    """A tensor over the file's data through a private (copy-on-write, never written) mapping."""
    nbytes = shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size()
    base = start - start % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), nbytes + start - base, offset=base, access=mmap.ACCESS_COPY)
    m.madvise(mmap.MADV_RANDOM)  # no readahead: a page per row read, not a folio (module doc)
    arr = np.frombuffer(m, dtype=np.uint8, count=nbytes, offset=start - base)
    return torch.from_numpy(arr).view(dtype).view(shape), m


def read_table(path, dtype: torch.dtype, shape: tuple[int, int], start: int, pin: bool,
               block_bytes: int = 64 << 20) -> torch.Tensor:
    """The file's table read into (pinned) host memory block by block, without mapping it."""
    out = torch.empty(shape, dtype=dtype, pin_memory=pin)
    view = memoryview(out.view(-1).view(torch.uint8).numpy())
    with open(path, "rb") as f:
        f.seek(start)
        for i in range(0, len(view), block_bytes):
            if f.readinto(view[i:i + block_bytes]) != len(view[i:i + block_bytes]):
                raise ValueError(f"{path}: truncated while reading the table")
    return out


# ---------------------------------------------------------------- the table

def file_rss_bytes() -> int:
    """Resident file-backed (+ shared) bytes of this process (/proc/self/statm; 0 without /proc)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[2]) * mmap.PAGESIZE
    except (OSError, IndexError, ValueError):
        return 0


class MapBudget:
    """When a memory-mapped table should unmap its touched pages. Each lookup adds an estimate of
    what it mapped (rows x the pages a row spans); at doubling checkpoints the process's
    file-backed RSS is read (one /proc read) and, if the kernel mapped more per row than that
    (whole large folios of a page cache filled by another process's sequential read), the
    per-row estimate is scaled up to match, so the budget holds then too."""

    def __init__(self, budget: int, row_bytes: int, rss_fn=file_rss_bytes):
        self.budget, self.row_bytes, self.rss_fn = budget, row_bytes, rss_fn
        self.reset()

    def reset(self) -> None:
        self.estimate, self.check_at, self.base = 0, self.budget // 64, self.rss_fn()

    def add(self, rows: int) -> bool:
        """Count a lookup of `rows` rows; True when the pages should be released now."""
        self.estimate += rows * self.row_bytes
        if self.estimate < self.check_at:
            return False
        mapped = self.rss_fn() - self.base
        if mapped > self.estimate:
            self.row_bytes *= mapped / self.estimate
            self.estimate = mapped
        if self.estimate >= self.budget:
            return True
        self.check_at = min(self.budget, 2 * self.estimate)
        return False


class OffloadedValueTable(nn.Module):
    """A value table served from `path` (see the module doc): where="disk" maps the file,
    where="host" reads it into (pinned) host memory. Inference only: it holds no parameter."""

    def __init__(self, path, num_rows: int, dim: int, num_chunks: int = 1, where: str = "disk",
                 dtype: torch.dtype | None = None, staged: bool = False, map_budget_mb: float | None = None):
        super().__init__()
        if where not in WHERE:
            raise ValueError(f"where: must be one of {WHERE} (got {where!r})")
        if dim % num_chunks:
            raise ValueError(f"dim: must be divisible by num_chunks={num_chunks} (got {dim})")
        self.path, self.where, self.staged = Path(path), where, staged
        self.num_rows, self.dim, self.num_chunks = num_rows, dim, num_chunks
        self.chunk_dim = dim // num_chunks
        self.sparse, self.lookup, self.read_counts = False, "fused", None  # ValueTable's attributes
        file_dtype, shape, start, _ = read_table_header(self.path)
        want = (num_rows * num_chunks, self.chunk_dim)
        if shape != want:
            raise ValueError(f"{self.path}: table shape {list(shape)} does not fit the layer "
                             f"({num_rows} rows x {num_chunks} chunks of {self.chunk_dim} -> {list(want)})")
        if dtype is not None and file_dtype != dtype:
            raise ValueError(f"{self.path}: table dtype {file_dtype}, expected {dtype}")
        self.dtype = file_dtype
        if where == "host":
            self.host = read_table(self.path, file_dtype, shape, start, pin=torch.cuda.is_available())
            self._mmap = None
        else:
            drop_page_cache(self.path)
            self.host, self._mmap = map_table(self.path, file_dtype, shape, start)
        # where="disk": unmap the touched pages (`release`) once they may exceed map_budget_mb
        row_bytes, page = self.bytes_per_row(), mmap.PAGESIZE
        aligned = start % page == 0 and page % row_bytes == 0  # then no row straddles two pages
        pages = -(-row_bytes // page) + (0 if aligned else 1)
        self._budget = (MapBudget(int(map_budget_mb * 2 ** 20), pages * page)
                        if self._mmap is not None and map_budget_mb is not None else None)

    @classmethod
    def factory(cls, path, **kwargs):
        """A `TableFactory` that serves the layer's table from `path` (nothing allocated in RAM)."""
        def build(num_rows, dim, num_chunks=1, sparse=False, lookup="fused"):
            return cls(path, num_rows, dim, num_chunks, **kwargs)
        return build

    def init_weights(self, std: float) -> None:
        """Nothing to do: the values come from the file."""

    def bytes_per_row(self) -> int:
        return self.dim * self.host.element_size()

    def rows(self) -> torch.Tensor:
        """The table as (N, dim) (reads the whole file: for inspection and tests)."""
        return self.host.view(self.num_rows, self.dim)

    def release(self) -> None:
        """Unmap the pages touched so far (RSS drops; the page cache keeps them for the next read)."""
        if self._mmap is not None:
            self._mmap.madvise(mmap.MADV_DONTNEED)
        if self._budget is not None:
            self._budget.reset()

    def _count_mapped(self, rows: int) -> None:
        if self._budget is not None and self._budget.add(rows):
            self.release()

    def _gather_rows(self, uniq_U: torch.Tensor) -> torch.Tensor:
        """The distinct rows read, gathered on the host into a (pinned) tensor, on uniq's device."""
        u_cpu = uniq_U.cpu()
        pin = uniq_U.device.type == "cuda"
        buf = torch.empty((u_cpu.numel(), self.chunk_dim), dtype=self.dtype, pin_memory=pin)
        torch.index_select(self.host, 0, u_cpu, out=buf)
        # the caching host allocator keeps `buf` alive until this asynchronous copy is done
        return buf.to(uniq_U.device, non_blocking=pin)

    def pool(self, row_TK: torch.Tensor, bag_TK: torch.Tensor | None, w_TKC: torch.Tensor,
             num_bags: int = 1, impl: str | None = None) -> torch.Tensor:
        """Weighted sums of kept rows per (token, bag, chunk) -> (T, num_bags, dim)."""
        if self.training and torch.is_grad_enabled():
            raise RuntimeError(_TRAIN_ERROR)
        w_TKC = w_TKC.to(self.dtype)
        if row_TK.device.type == "cpu" and not self.staged:
            out = pool_fused(self.host, row_TK, bag_TK, w_TKC, num_bags)
            self._count_mapped(row_TK.numel())
        else:
            out = pool_gathered(self._gather_rows, row_TK, bag_TK, w_TKC, num_bags)
            self._count_mapped(row_TK.numel())
        return out.reshape(row_TK.shape[0], num_bags, self.dim)

    def extra_repr(self) -> str:
        return (f"rows={self.num_rows}, dim={self.dim}, chunks={self.num_chunks}, where={self.where}, "
                f"staged={self.staged}, path={str(self.path)!r}")


# ---------------------------------------------------------------- model level

def save_table(table: nn.Module, path, block_rows: int = 1 << 20) -> Path:
    """Write a `ValueTable`'s weight to a table file, block by block."""
    w = table.weight.detach()
    meta = {"format": "ultramem-values", "num_rows": str(table.num_rows), "dim": str(table.dim),
            "num_chunks": str(table.num_chunks)}
    blocks = (w[i:i + block_rows] for i in range(0, w.shape[0], block_rows))
    return write_table_file(path, tuple(w.shape), w.dtype, blocks, meta)


def offload_values(model: nn.Module, path, where: str = "disk", staged: bool | None = None) -> list[Path]:
    """Write every memory layer's table to `path`/<layer name>.values.safetensors and serve it
    from there (`OffloadedValueTable`), in place. staged (default: the table was on a GPU) moves
    only the rows read to the indices' device each step. Returns the files written."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MemoryLayer)]
    if not layers:
        raise ValueError(f"model: has no memory layer to offload (got {type(model).__name__})")
    files = []
    for name, layer in layers:
        table = layer.values
        if not isinstance(getattr(table, "weight", None), torch.Tensor):
            raise ValueError(f"{name or 'model'}.values: expected an in-memory table with a `weight` "
                             f"(got {type(table).__name__})")
        file = save_table(table, Path(path) / f"{name or 'memory'}.values.safetensors")
        on_gpu = table.weight.device.type != "cpu"
        layer.values = OffloadedValueTable(file, table.num_rows, table.dim, table.num_chunks, where=where,
                                           dtype=table.weight.dtype,
                                           staged=on_gpu if staged is None else staged)
        files.append(file)
    return files
