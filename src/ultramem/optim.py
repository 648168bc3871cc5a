"""Optimiser construction, learning-rate schedules and gradient clipping.

Parameter groups (the contract's trainer rule):
  values   -- model.value_parameters(): memory value tables. value_weight_decay (default 0), their
              own lr multiplier schedule (SPEC section 4), on the path `value_optimizer` picks.
  no_decay -- remaining params with ndim < 2 (norm gains, biases) or named "...cores".
  decay    -- everything else.

Value path per table (`value_optimizer`, chosen per value tensor; `Optimizer.value_paths` says
which each one got and the trainer logs it):
  "adamw"      today's default: a group of the dense AdamW; a table configured with
               sparse_values=True keeps torch.optim.SparseAdam (path "sparse_adam").
  "sparse"     SparseValueAdamW (ultramem.sparse_adam): row-sparse AdamW, lazy exact weight decay.
  "sparse_row" the same with one second-moment scalar per row (state ~1/D of Adam's v).
  "auto"       "sparse" for tables of >= AUTO_SPARSE_MIN_PARAMS parameters, else as "adamw".
The sparse paths switch the table to emitting row-sparse gradients (its `sparse` flag), since a
dense gradient of a huge table costs as much as the dense step they avoid.

The torch optimisers hide behind `Optimizer`, which has the usual step / zero_grad /
state_dict / load_state_dict and sets the per-step lr of every group from `LRSchedule`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .memory import memory_layers
from .sparse_adam import SparseValueAdamW

GROUP_NAMES = ("decay", "no_decay", "values")


def value_lr_multiplier(step: int, mult: float, decay_steps: int) -> float:
    """mult(step) = 1 + (M-1) * max(0, 1 - step/S); S <= 0 means no boost at all."""
    if decay_steps <= 0:
        return 1.0
    return 1.0 + (mult - 1.0) * max(0.0, 1.0 - step / decay_steps)


@dataclass
class LRSchedule:
    """Linear warm-up, then cosine from 1 down to min_lr_ratio at total_steps (factors of base lr).

    The value groups get value_lr_multiplier(step) on top of the same factor.
    """

    total_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    value_lr_mult: float = 4.0
    value_lr_decay_frac: float = 0.25

    def __post_init__(self):
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={self.total_steps}], "
                             f"got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.value_lr_mult <= 0:
            raise ValueError(f"value_lr_mult must be > 0, got {self.value_lr_mult}")
        if self.value_lr_decay_frac < 0:
            raise ValueError(f"value_lr_decay_frac must be >= 0, got {self.value_lr_decay_frac}")

    @property
    def value_decay_steps(self) -> int:
        return round(self.value_lr_decay_frac * self.total_steps)

    def factor(self, step: int) -> float:
        """lr factor for 0-indexed optimiser step `step` (the step about to be taken)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine

    def value_factor(self, step: int) -> float:
        return self.factor(step) * value_lr_multiplier(step, self.value_lr_mult, self.value_decay_steps)


def split_param_groups(model: nn.Module, decay_memory_all: bool = False,
                       ) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Split trainable params into values / no_decay / decay; each param lands in exactly one.

    decay_memory_all: the memory layers' norm gains and Tucker cores go to `decay` too (the
    authors' recipe decays every memory tensor; by default gains and cores are not decayed)."""
    value_params = model.value_parameters() if hasattr(model, "value_parameters") else []
    value_ids = {id(p) for p in value_params}
    memory_ids = {id(p) for m in memory_layers(model) for p in m.parameters()} if decay_memory_all else set()
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in GROUP_NAMES}
    seen: dict[int, str] = {}
    # named_parameters() drops duplicates (tied weights), so a tied param is grouped once.
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in value_ids:
            g = "values"
        elif id(p) in memory_ids:
            g = "decay"
        elif p.ndim < 2 or name.endswith("cores"):
            g = "no_decay"
        else:
            g = "decay"
        groups[g].append((name, p))
        seen[id(p)] = name
    missing = [p for p in value_params if id(p) not in seen and p.requires_grad]
    if missing:
        raise ValueError(f"value_parameters() returned {len(missing)} tensor(s) that are not "
                         "registered parameters of the model")
    all_ids = [id(p) for ps in groups.values() for _, p in ps]
    n_trainable = len({id(p) for p in model.parameters() if p.requires_grad})
    assert len(all_ids) == len(set(all_ids)) == n_trainable, "each parameter must be in exactly one group"
    return groups


def detect_sparse_values(model: nn.Module) -> bool:
    """True when any value table emits row-sparse gradients.

    Memory layers say it through their table's `sparse` flag (the MemoryLayer contract); any other
    model with `value_parameters()` is asked through the modules owning those parameters (a
    `sparse` flag as nn.Embedding / EmbeddingBag have, or `sparse_values` on their cfg/config)."""
    layers = memory_layers(model)
    if layers:
        return any(getattr(layer.values, "sparse", False) for layer in layers)
    if not hasattr(model, "value_parameters"):
        return False
    value_ids = {id(p) for p in model.value_parameters()}
    for mod in model.modules():
        if not any(id(p) in value_ids for p in mod.parameters(recurse=False)):
            continue
        for owner in (mod, getattr(mod, "cfg", None), getattr(mod, "config", None)):
            if owner is None:
                continue
            if getattr(owner, "sparse", False) or getattr(owner, "sparse_values", False):
                return True
    return False


VALUE_OPTIMIZERS = ("adamw", "sparse", "sparse_row", "auto")
# "auto" takes the sparse path for a value tensor of at least this many parameters: the crossover
# measured with `ultramem bench optim --table-values ...` on the 2-core dev machine (1 thread,
# 8,192 touched rows of 128 per step; README, "Sparse value optimizer"): from 16M parameters
# SparseValueAdamW's step alone beat fused dense AdamW (1.2x; 76x at 320M), and with the dense
# gradient's materialisation and clipping counted it already won from 8M. It assumes few touched
# rows per step: a batch that touches most of the table (the tiny presets) favours dense AdamW.
AUTO_SPARSE_MIN_PARAMS = 16_000_000


def resolve_value_paths(value_params: list[tuple[str, nn.Parameter]], value_optimizer: str,
                        sparse_values: bool) -> dict[str, str]:
    """name -> path ("adamw", "sparse_adam", "sparse" or "sparse_row") of every value tensor."""
    if value_optimizer not in VALUE_OPTIMIZERS:
        raise ValueError(f"value_optimizer: must be one of {list(VALUE_OPTIMIZERS)} "
                         f"(got {value_optimizer!r})")
    legacy = "sparse_adam" if sparse_values else "adamw"
    paths = {}
    for name, p in value_params:
        if value_optimizer == "auto":
            paths[name] = "sparse" if p.numel() >= AUTO_SPARSE_MIN_PARAMS else legacy
        else:
            paths[name] = legacy if value_optimizer == "adamw" else value_optimizer
    return paths


def emit_sparse_grads(model: nn.Module, params: list[nn.Parameter]) -> None:
    """Switch the modules owning `params` (value tables, embeddings: a `sparse` flag) to row-sparse
    gradients. A flag, not state: checkpoints and the model config do not change."""
    ids = {id(p) for p in params}
    for mod in model.modules():
        if isinstance(getattr(mod, "sparse", None), bool) and any(
                id(p) in ids for p in mod.parameters(recurse=False)):
            mod.sparse = True


class Optimizer:
    """AdamW for decay/no_decay (and dense-path values), SparseAdam for legacy sparse values and
    SparseValueAdamW for the sparse value paths, driven by one LRSchedule."""

    def __init__(self, groups, lr: float, schedule: LRSchedule | None, weight_decay: float,
                 betas: tuple[float, float], eps: float, sparse_values: bool, *,
                 value_paths: dict[str, str] | None = None, value_weight_decay: float = 0.0):
        self.base_lr = lr
        self.schedule = schedule
        if value_paths is None:
            value_paths = resolve_value_paths(groups["values"], "adamw", sparse_values)
        self.value_paths = value_paths
        self.value_sizes = {n: p.numel() for n, p in groups["values"]}
        by_path = {k: [p for n, p in groups["values"] if value_paths[n] == k]
                   for k in ("adamw", "sparse_adam", "sparse", "sparse_row")}
        self.sparse_values = bool(by_path["sparse_adam"])  # the legacy SparseAdam path is in use
        if by_path["sparse_adam"] and value_weight_decay:
            raise ValueError("value_weight_decay: torch SparseAdam cannot decay; use "
                             f"value_optimizer='sparse' (got {value_weight_decay})")
        self.adamw = self._build_adamw(groups, by_path["adamw"], lr, weight_decay, value_weight_decay,
                                       betas, eps)
        self.sparse = None
        if by_path["sparse_adam"]:
            self.sparse = torch.optim.SparseAdam(by_path["sparse_adam"], lr=lr, betas=betas, eps=eps)
            self.sparse.param_groups[0]["name"] = "values"
        row_groups = [{"params": by_path[k], "row_state": "full" if k == "sparse" else "row",
                       "name": "values"} for k in ("sparse", "sparse_row") if by_path[k]]
        self.rowsparse = None
        if row_groups:
            self.rowsparse = SparseValueAdamW(row_groups, lr=lr, betas=betas, eps=eps,
                                              weight_decay=value_weight_decay)
        self.set_step(0)

    @staticmethod
    def _build_adamw(groups, values, lr, weight_decay, value_weight_decay, betas, eps):
        adamw_groups = []
        for name, wd, params in (("decay", weight_decay, [p for _, p in groups["decay"]]),
                                 ("no_decay", 0.0, [p for _, p in groups["no_decay"]]),
                                 ("values", value_weight_decay, values)):
            if params:
                adamw_groups.append({"params": params, "weight_decay": wd, "name": name})
        if not adamw_groups:
            return None
        # the fused kernel is ~6x faster than the per-tensor loop on CPU for small models
        devices = {p.device.type for g in adamw_groups for p in g["params"]}
        fused = True if devices <= {"cpu", "cuda"} else None
        return torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps, fused=fused)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.adamw, self.sparse, self.rowsparse) if o is not None]

    def parts(self) -> list[tuple[str, torch.optim.Optimizer | None]]:
        """(state_dict key, torch optimiser or None) of every part, for checkpoint checks."""
        return [("adamw", self.adamw), ("sparse", self.sparse), ("rowsparse", self.rowsparse)]

    def describe_value_paths(self) -> str:
        """One line for the run log: which optimiser path each value tensor uses."""
        label = {"adamw": "dense AdamW", "sparse_adam": "torch SparseAdam", "sparse": "SparseValueAdamW",
                 "sparse_row": "SparseValueAdamW row-state"}
        return "; ".join(f"{n} ({self.value_sizes.get(n, 0):,} params): {label[k]}"
                         for n, k in self.value_paths.items())

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def params(self) -> list[nn.Parameter]:
        return [p for g in self.param_groups for p in g["params"]]

    def set_step(self, step: int) -> None:
        """Set every group's lr for 0-indexed optimiser step `step`."""
        for g in self.param_groups:
            if self.schedule is None:
                factor = 1.0
            elif g["name"] == "values":
                factor = self.schedule.value_factor(step)
            else:
                factor = self.schedule.factor(step)
            g["lr"] = self.base_lr * factor

    def lrs(self) -> dict[str, float]:
        return {g["name"]: g["lr"] for g in self.param_groups}

    def _fix_grad_layouts(self) -> None:
        # A value table may emit either layout depending on its config; each torch optimiser
        # accepts only one, so convert instead of failing (rare path: costs a densify/sparsify).
        if self.adamw is not None:
            for g in self.adamw.param_groups:
                for p in g["params"]:
                    if p.grad is not None and p.grad.is_sparse:
                        p.grad = p.grad.to_dense()
        if self.sparse is not None:
            for p in self.sparse.param_groups[0]["params"]:
                if p.grad is not None and not p.grad.is_sparse:
                    p.grad = p.grad.to_sparse(sparse_dim=1)

    def step(self) -> None:
        self._fix_grad_layouts()
        for o in self.optimizers:
            o.step()

    def flush_decay(self) -> None:
        """Apply the sparse value path's pending (lazy) weight decay to every row: call before
        saving or evaluating the weights. A no-op on the other paths."""
        if self.rowsparse is not None:
            self.rowsparse.flush_decay()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        # "rowsparse" only when present: checkpoints of the other paths keep their old layout
        sd = {key: opt.state_dict() if opt else None for key, opt in self.parts()}
        if sd["rowsparse"] is None:
            del sd["rowsparse"]
        return sd

    def load_state_dict(self, sd: dict) -> None:
        for key, opt in self.parts():
            if (sd.get(key) is None) != (opt is None):
                raise ValueError(f"optimizer state: the saved state {'lacks' if opt else 'has'} a '{key}' "
                                 f"part and this optimizer {'has' if opt else 'has not'} (sparse_values or "
                                 f"value_optimizer differs? this optimizer's value paths: "
                                 f"{self.describe_value_paths()})")
        for key, opt in self.parts():
            if opt is None:
                continue
            saved = [len(g["params"]) for g in sd[key]["param_groups"]]
            if saved != [len(g["params"]) for g in opt.param_groups]:
                raise ValueError(f"optimizer state '{key}': saved groups have {saved} params, this model has "
                                 f"{[len(g['params']) for g in opt.param_groups]}")
            opt.load_state_dict(sd[key])


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1, value_lr_mult: float = 4.0,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                    total_steps: int | None = None, warmup_steps: int = 0, min_lr_ratio: float = 0.1,
                    value_lr_decay_frac: float = 0.25, sparse_values: bool | None = None,
                    value_optimizer: str = "adamw", value_weight_decay: float = 0.0,
                    decay_memory_all: bool = False) -> Optimizer:
    """AdamW (+ SparseAdam / SparseValueAdamW per value_optimizer) with the contract's groups and schedules.

    total_steps=None disables the schedule: every group keeps `lr` (values included).
    sparse_values=None detects it from the model (detect_sparse_values).
    value_optimizer: see the module docstring; a table on a sparse path is switched to sparse grads.
    """
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if value_weight_decay < 0:
        raise ValueError(f"value_weight_decay: must be >= 0 (got {value_weight_decay})")
    if not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must lie in [0, 1), got {betas}")
    groups = split_param_groups(model, decay_memory_all)
    if sparse_values is None:
        sparse_values = detect_sparse_values(model)
    paths = resolve_value_paths(groups["values"], value_optimizer, bool(sparse_values))
    emit_sparse_grads(model, [p for n, p in groups["values"] if paths[n] in ("sparse", "sparse_row")])
    schedule = None
    if total_steps is not None:
        schedule = LRSchedule(total_steps=total_steps, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio,
                              value_lr_mult=value_lr_mult, value_lr_decay_frac=value_lr_decay_frac)
    return Optimizer(groups, lr=lr, schedule=schedule, weight_decay=weight_decay, betas=tuple(betas),
                     eps=eps, sparse_values=bool(sparse_values), value_paths=paths,
                     value_weight_decay=value_weight_decay)


def clip_grad_norm(params, max_norm: float | None) -> torch.Tensor:
    """Global L2 norm of all grads (dense and sparse COO), clipped to max_norm when given.

    torch's clip_grad_norm_ cannot take sparse grads; a sparse grad may hold repeated indices,
    so it is coalesced (duplicates summed) before its values enter the norm.
    """
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    dense = [p for p in params if not p.grad.is_sparse]
    sparse = [p for p in params if p.grad.is_sparse]
    for p in sparse:
        p.grad = p.grad.coalesce()
    sq = [torch.nn.utils.get_total_norm([p.grad for p in dense]).float().square()] if dense else []
    sq += [p.grad._values().float().square().sum() for p in sparse]
    total = torch.stack([s.to(sq[0].device) for s in sq]).sum().sqrt()
    if max_norm is not None and max_norm > 0:
        if dense:
            torch.nn.utils.clip_grads_with_norm_(dense, max_norm, total)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in sparse:
            p.grad._values().mul_(coef.to(p.grad.device))
    return total
