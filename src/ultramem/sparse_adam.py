"""SparseValueAdamW: AdamW for huge value tables whose steps touch few rows (SPEC section 10).

Each step updates only the rows its gradient touches: a row-sparse COO gradient (what a value
table emits with sparse=True; coalesced here) or a dense gradient, whose non-zero rows count as
touched. On those rows the update is AdamW's, with two documented differences from dense AdamW:

- Moments of untouched rows are not decayed (lazy Adam, as torch.optim.SparseAdam): a row's m and
  v only change on the steps that touch it.
- Bias correction uses the GLOBAL step counter t (as dense AdamW and torch SparseAdam), not a
  per-row count of touches: no extra per-row state, and the first touch of a row late in training
  moves it by ~(1-b1)/sqrt(1-b2) * lr rather than a full lr.

Decoupled weight decay stays exact, lazily: every row remembers the step it was last brought up
to date (`last_step`), and the optimizer keeps the running sum L[t] = sum_{s<=t} log(1 - lr_s wd)
(float64, one entry per step, so the lr schedule's values are remembered). When a row is next
touched at step t, the decay of every step it missed, prod_{s=last+1..t} (1 - lr_s wd) =
exp(L[t] - L[last]), is applied first, in O(1) per row. `flush_decay()` brings every row up to
date (call it before saving weights or evaluating: then the weights equal dense decay's).

Flushing rounds: prod(a) * prod(b) is not bitwise prod(a * b), so a flush at a step where an
uninterrupted run did not flush moves the trajectory by float rounding (~1 ulp on rows with
pending decay). Resuming from a checkpoint therefore equals the uninterrupted run bit for bit
when that run also flushed at the checkpoint's step (or weight_decay is 0), and to rounding
otherwise. With weight_decay 0 nothing is pending and flush_decay changes nothing.

Options:
  row_state="row"   one second-moment scalar per row (mean of the squared gradient over the row,
                    row-wise Adam as in recommender systems): v is (R,) instead of (R, D).
  first_moment=False  no m: the update is g / (sqrt(v_hat) + eps) (bias-corrected RMSProp).
  exact=True        update every row every step (untouched rows see a zero gradient): with
                    row_state="full" and first_moment=True this is torch.optim.AdamW's
                    single-tensor path op for op, bit for bit. For tests; costs a dense step.

State per parameter (tensors only, so it round-trips through ultramem.checkpoint):
  step () int64, last_step (R,) int32, log_decay (t+1,) float64, exp_avg (R, D) if first_moment,
  exp_avg_sq (R, D) or (R,).

Shape legend: R rows of a parameter (its dim 0), D row width (the other dims flattened),
n touched rows this step.
"""

from __future__ import annotations

import math

import torch

ROW_STATES = ("full", "row")


def _fail(field: str, rule: str, value) -> None:
    raise ValueError(f"{field}: {rule} (got {value!r})")


def _check_args(lr, betas, eps, weight_decay, row_state, first_moment, exact) -> None:
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        _fail("lr", "must be a number > 0", lr)
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)):
        _fail("betas", "must be two numbers in [0, 1)", betas)
    if not isinstance(eps, (int, float)) or not eps >= 0:
        _fail("eps", "must be a number >= 0", eps)
    if not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        _fail("weight_decay", "must be a number >= 0", weight_decay)
    if row_state not in ROW_STATES:
        _fail("row_state", f"must be one of {list(ROW_STATES)}", row_state)
    if not isinstance(first_moment, bool):
        _fail("first_moment", "must be a bool", first_moment)
    if not isinstance(exact, bool):
        _fail("exact", "must be a bool", exact)


def _touched_rows(grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(row ids (n,), their gradient (n, D)) of a sparse or dense gradient; ids None = all rows."""
    if grad.is_sparse:
        if grad.sparse_dim() != 1:  # fully sparse COO: rare, make it row-sparse
            return _touched_rows(grad.to_dense())
        grad = grad.coalesce()  # duplicates summed, ids sorted and unique
        vals = grad._values()
        return grad._indices()[0], vals.reshape(vals.shape[0], math.prod(vals.shape[1:]))
    g_RD = grad.reshape(grad.shape[0], -1)
    idx_n = g_RD.ne(0).any(dim=1).nonzero().squeeze(1)
    return idx_n, g_RD.index_select(0, idx_n)


class SparseValueAdamW(torch.optim.Optimizer):
    """Row-sparse AdamW with lazy exact decoupled weight decay; see the module docstring."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, row_state: str = "full", first_moment: bool = True,
                 exact: bool = False):
        _check_args(lr, betas, eps, weight_decay, row_state, first_moment, exact)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, row_state=row_state,
                        first_moment=first_moment, exact=exact)
        super().__init__(params, defaults)
        for g in self.param_groups:
            for p in g["params"]:
                if p.ndim < 1:
                    _fail("params", "every tensor needs a row dimension (ndim >= 1)", tuple(p.shape))

    # ------------------------------------------------------------------ state

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        st = self.state[p]
        if st:
            return st
        R, D = p.shape[0], p[0].numel()
        st["step"] = torch.zeros((), dtype=torch.int64)
        st["last_step"] = torch.zeros(R, dtype=torch.int32, device=p.device)
        st["log_decay"] = torch.zeros(16, dtype=torch.float64)  # capacity; entries 0..step valid
        if group["first_moment"]:
            st["exp_avg"] = torch.zeros(R, D, dtype=p.dtype, device=p.device)
        v_shape = (R, D) if group["row_state"] == "full" else (R,)
        st["exp_avg_sq"] = torch.zeros(v_shape, dtype=p.dtype, device=p.device)
        return st

    @staticmethod
    def _record_decay(st: dict, t: int, lr: float, wd: float) -> None:
        """L[t] = L[t-1] + log(1 - lr wd), growing the buffer by doubling (amortised O(1))."""
        if lr * wd >= 1.0:
            _fail("weight_decay", f"lr * weight_decay must be < 1 (lr={lr})", wd)
        buf = st["log_decay"]
        if t >= buf.numel():
            st["log_decay"] = buf = torch.cat([buf, torch.zeros_like(buf)])
        buf[t] = buf[t - 1] + math.log1p(-lr * wd)

    def state_bytes(self) -> int:
        """Bytes held by the optimizer state (all tensors, the log_decay history included)."""
        return sum(v.numel() * v.element_size() for st in self.state.values() for v in st.values()
                   if isinstance(v, torch.Tensor))

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self._init_state(p, group)
                st["step"] += 1
                t = int(st["step"])
                self._record_decay(st, t, group["lr"], group["weight_decay"])
                if group["exact"]:
                    self._step_all_rows(p, st, group, t)
                else:
                    self._step_touched_rows(p, st, group, t)
        return loss

    def _step_all_rows(self, p, st, group, t: int) -> None:
        g = p.grad.to_dense() if p.grad.is_sparse else p.grad
        w_RD = p.view(p.shape[0], -1)
        if group["weight_decay"] != 0:
            w_RD.mul_(1 - group["lr"] * group["weight_decay"])  # as torch's AdamW, op for op
        st["last_step"].fill_(t)
        _adam_rows(w_RD, g.reshape(w_RD.shape), st.get("exp_avg"), st["exp_avg_sq"], group, t)

    def _step_touched_rows(self, p, st, group, t: int) -> None:
        idx_n, g_nD = _touched_rows(p.grad)
        if idx_n.numel() == 0:
            return
        w_RD = p.view(p.shape[0], -1)
        w_nD = w_RD.index_select(0, idx_n)
        last_n = st["last_step"].index_select(0, idx_n)
        if group["weight_decay"] != 0:
            w_nD.mul_(_decay_factors(st["log_decay"], last_n, t, w_nD.dtype)[:, None])
        st["last_step"].index_fill_(0, idx_n, t)
        m = st.get("exp_avg")
        m_nD = m.index_select(0, idx_n) if m is not None else None
        v_n = st["exp_avg_sq"].index_select(0, idx_n)
        g_nD = g_nD.to(w_nD.dtype)
        if m_nD is not None and v_n.ndim == 2 and _FUSED is not None:
            _fused_adam_rows(w_nD, g_nD, m_nD, v_n, group, t)
        else:
            _adam_rows(w_nD, g_nD, m_nD, v_n, group, t)
        w_RD.index_copy_(0, idx_n, w_nD)
        st["exp_avg_sq"].index_copy_(0, idx_n, v_n)
        if m is not None:
            m.index_copy_(0, idx_n, m_nD)

    @torch.no_grad()
    def flush_decay(self) -> None:
        """Apply every row's pending weight decay (O(table)); afterwards the weights equal what
        dense decoupled decay gives. Call before saving weights or evaluating."""
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if not st or group["weight_decay"] == 0:
                    continue
                t = int(st["step"])
                w_RD = p.view(p.shape[0], -1)
                w_RD.mul_(_decay_factors(st["log_decay"], st["last_step"], t, w_RD.dtype)[:, None])
                st["last_step"].fill_(t)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        sd = super().state_dict()
        for st in sd["state"].values():  # only the valid part of the history, and copies
            st["log_decay"] = st["log_decay"][: int(st["step"]) + 1].clone()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Exact restore: every state tensor keeps its saved dtype (torch's default load would
        cast the float64 history and the int32 step ids to the parameter's dtype)."""
        params = [p for g in self.param_groups for p in g["params"]]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        if len(ids) != len(params):
            _fail("state_dict", f"has {len(ids)} params, this optimizer {len(params)}", len(ids))
        saved = state_dict["state"]
        for pid, p in zip(ids, params, strict=True):
            if pid in saved:
                self._check_saved(p, saved[pid])
        for g, sg in zip(self.param_groups, state_dict["param_groups"], strict=True):
            g.update({k: v for k, v in sg.items() if k != "params"})
        self.state.clear()
        for pid, p in zip(ids, params, strict=True):
            if pid in saved:
                # step and the history stay on the CPU (read as Python numbers every step)
                self.state[p] = {k: v.detach().clone().to("cpu" if k in ("step", "log_decay") else p.device)
                                 for k, v in saved[pid].items()}

    @staticmethod
    def _check_saved(p: torch.Tensor, st: dict) -> None:
        R = p.shape[0]
        for k, v in st.items():
            if not isinstance(v, torch.Tensor):
                _fail(f"state_dict.{k}", "must be a tensor", type(v).__name__)
            if k in ("exp_avg", "exp_avg_sq", "last_step") and v.shape[0] != R:
                _fail(f"state_dict.{k}", f"must have {R} rows like its parameter", tuple(v.shape))

    def check_state_shapes(self, state_dict: dict) -> None:
        """Raise ValueError when `state_dict` does not fit these parameters (checkpoint loading)."""
        params = [p for g in self.param_groups for p in g["params"]]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        if len(ids) != len(params):
            _fail("state_dict", f"has {len(ids)} params, this optimizer {len(params)}", len(ids))
        for pid, p in zip(ids, params, strict=True):
            if pid in state_dict["state"]:
                self._check_saved(p, state_dict["state"][pid])


def _decay_factors(log_decay: torch.Tensor, last_n: torch.Tensor, t: int, dtype) -> torch.Tensor:
    """prod_{s=last+1..t} (1 - lr_s wd) per row, from the float64 running log-sum."""
    L = log_decay[: t + 1].to(last_n.device)  # a no-op on CPU; on GPU the used history only
    return torch.exp(L[t] - L.index_select(0, last_n.long())).to(dtype)


# torch's fused AdamW kernel (what AdamW(fused=True) runs): one pass over the gathered rows instead
# of ~8, ~3x faster on CPU. Equal to the single-tensor op order to ~1 ulp, not bits, so exact mode
# (which promises torch AdamW's default path bit for bit) keeps `_adam_rows`.
_FUSED = getattr(torch, "_fused_adamw_", None)


def _fused_adam_rows(w_nD, g_nD, m_nD, v_nD, group: dict, t: int) -> None:
    beta1, beta2 = group["betas"]
    step = torch.tensor(float(t), device=w_nD.device)
    _FUSED([w_nD], [g_nD], [m_nD], [v_nD], [], [step], lr=group["lr"], beta1=beta1, beta2=beta2,
           weight_decay=0.0, eps=group["eps"], amsgrad=False, maximize=False)  # decay applied lazily before


def _adam_rows(w_nD, g_nD, m_nD, v, group: dict, t: int) -> None:
    """One Adam step in place on rows w (weight decay already applied), in torch AdamW's op order.

    v is (n, D) (full) or (n,) (row-wise: the row mean of g^2)."""
    beta1, beta2 = group["betas"]
    lr, eps = group["lr"], group["eps"]
    bias_correction2_sqrt = (1 - beta2**t) ** 0.5
    if v.ndim == 1:
        v.mul_(beta2).add_(g_nD.square().mean(dim=1), alpha=1 - beta2)
        denom = v.sqrt().div_(bias_correction2_sqrt).add_(eps)[:, None]
    else:
        v.mul_(beta2).addcmul_(g_nD, g_nD, value=1 - beta2)
        # in place, same ops and order as torch's (v.sqrt() / c).add_(eps): one temporary, same bits
        denom = v.sqrt().div_(bias_correction2_sqrt).add_(eps)
    if m_nD is None:
        w_nD.addcdiv_(g_nD, denom, value=-lr)
        return
    m_nD.lerp_(g_nD, 1 - beta1)
    w_nD.addcdiv_(m_nD, denom, value=-lr / (1 - beta1**t))
