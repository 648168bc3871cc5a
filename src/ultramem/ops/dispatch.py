"""The one place that picks an implementation of each op for a device and dtype.

Every op in `ultramem.ops` has a plain torch *reference* (the test oracle) and one or more fast
paths registered here with a predicate on the inputs (device type, dtype, whether a backend such
as Triton is importable). `select(op, tensor)` returns the first fast path whose predicate
accepts the tensor, else the reference. Layers never pass implementation strings around: they
call the op, and this table decides.

`force_reference()` (a context manager, or `set_force_reference(True)`) makes every op run its
reference: the switch for debugging a fast path against the oracle.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Impl:
    """One implementation of an op: `accepts(tensor)` says whether it can run on that input."""

    name: str
    fn: Callable
    accepts: Callable[[torch.Tensor], bool]


_REGISTRY: dict[str, list[Impl]] = {}
_REFERENCE: dict[str, Impl] = {}
_force_reference = False


def register(op: str, name: str, fn: Callable, accepts: Callable[[torch.Tensor], bool] | None = None,
             reference: bool = False) -> Callable:
    """Register `fn` as implementation `name` of `op`. Fast paths registered later take priority
    (a Triton kernel registered after the torch fast path wins where it accepts the input)."""
    impl = Impl(name, fn, accepts or (lambda _t: True))
    if reference:
        _REFERENCE[op] = impl
    else:
        _REGISTRY.setdefault(op, []).insert(0, impl)
    return fn


def implementations(op: str) -> dict[str, Callable]:
    """Every registered implementation of `op` by name (the reference under its own name)."""
    out = {impl.name: impl.fn for impl in _REGISTRY.get(op, [])}
    if op in _REFERENCE:
        out[_REFERENCE[op].name] = _REFERENCE[op].fn
    return out


def select(op: str, t: torch.Tensor) -> Impl:
    """The implementation of `op` that runs on input `t` (the reference when forced or when no
    fast path accepts it)."""
    if op not in _REFERENCE:
        raise KeyError(f"ops: no op named {op!r}; known: {sorted(_REFERENCE)}")
    if not _force_reference:
        for impl in _REGISTRY.get(op, []):
            if impl.accepts(t):
                return impl
    return _REFERENCE[op]


def set_force_reference(enabled: bool) -> None:
    global _force_reference
    _force_reference = bool(enabled)


def reference_forced() -> bool:
    return _force_reference


@contextlib.contextmanager
def force_reference(enabled: bool = True) -> Iterator[None]:
    """Run every op through its reference inside the block (restored on exit, also on error)."""
    before = _force_reference
    set_force_reference(enabled)
    try:
        yield
    finally:
        set_force_reference(before)
