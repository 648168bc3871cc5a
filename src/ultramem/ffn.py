"""Feed-forward blocks: a dense SwiGLU FFN and a dropless top-k Mixture-of-Experts of SwiGLU experts.

Shape legend (the package's, see `ultramem/__init__.py`): B batch, T time (tokens when B*T is
flattened), D model width, F hidden width (per expert), E experts, K experts kept per token (top-k),
A = T*K routed (token, slot) assignments.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# The gather (decode) path copies every selected expert's weights once per (token, slot) pair; it
# saves ~0.06 ms of sort/unsort bookkeeping, so it pays only while that copy is small. Measured on
# the 2-core CPU box (fp32, forward, min of 41, 1 thread as other jobs loaded both cores;
# grouped -> gather ms at S pairs, E/K = 8/2 unless noted):
#   D=64  H=128  (98 KB/expert):  S=2 .20->.13, S=16 .24->.21, S=32 .27->.28
#   D=128 H=256  (393 KB/expert): S=2 .21->.16, S=8 .28->.28, S=16 .34->.44
#   D=256 H=512  (1.5 MB/expert, E=16): S=2 .29->.27, S=4 .40->.46, S=8 1.0->1.2
#   D=512 H=1024 (6.3 MB/expert, E=64): S=2 1.38->1.58, S=4 1.76->2.61
# so the crossover sits at about 2 MB of gathered weights.
DECODE_MAX_BYTES = 2 * 2**20


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN: w_down(silu(x W_gate) * (x W_up)), no biases.

    Gate and up projections are fused into one (D -> 2H) linear: one matmul instead of two.
    The first H output features are the gate, the last H the up projection.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        _check_positive(dim=dim, hidden=hidden)
        self.dim, self.hidden = dim, hidden
        self.w_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_in(x_BTD).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)


class MoE(nn.Module):
    """Dropless top-k Mixture-of-Experts with SwiGLU experts and a Switch-style balance loss.

    router: Linear(D -> E, no bias); probs = softmax(router(x)) in fp32; keep the top-k experts.
    renormalize: whether the kept k weights are rescaled to sum to 1. Default (None) means
    "renormalise when topk > 1": with topk == 1 a renormalised weight is always 1 and the router
    would learn from the balance loss alone, so Switch-style top-1 keeps the raw probability.

    Expert weights live in two batched tensors: w_in (E, D, 2H) (gate | up, fused as in SwiGLU)
    and w_out (E, H, D). Every (token, slot) pair is computed: no capacity, no dropping.

    Two equivalent compute paths (same maths, tested against each other and a per-token oracle):
    - grouped: sort the S pairs by expert, one grouped matmul over contiguous per-expert slices
      (F.grouped_mm when the build has it and strides allow, else a loop over the non-empty
      experts, never over tokens), unsort, weighted sum over the K slots;
    - gather: for decode-size batches (S * bytes of one expert <= decode_max_bytes), gather the
      selected experts' weights per pair and use one bmm; it skips the sort/unsort bookkeeping.

    Balance loss (Switch Transformer, generalised to top-k): coef * E * sum_e f_e * P_e with
    f_e = (pairs routed to e) / S (no gradient) and P_e = mean over tokens of probs[:, e].
    It equals coef for a perfectly uniform router; read it with aux_loss() after a forward.

    Set `record_routing = True` to keep the last routing in `last_expert_ids` (N, K) long
    (token order, detached) for byte accounting; off by default so training keeps no extra refs.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, topk: int, balance_coef: float = 0.01,
                 renormalize: bool | None = None, decode_max_bytes: int = DECODE_MAX_BYTES):
        super().__init__()
        _check_positive(dim=dim, hidden=hidden, num_experts=num_experts, topk=topk)
        if topk > num_experts:
            raise ValueError(f"MoE topk must be <= num_experts ({num_experts}), got {topk}")
        if balance_coef < 0:
            raise ValueError(f"MoE balance_coef must be >= 0, got {balance_coef}")
        self.dim, self.hidden, self.num_experts, self.topk = dim, hidden, num_experts, topk
        self.balance_coef = balance_coef
        self.renormalize = topk > 1 if renormalize is None else bool(renormalize)
        self.decode_max_bytes = decode_max_bytes
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.record_routing = False
        self.last_expert_ids: torch.Tensor | None = None
        self._aux = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same scale as nn.Linear's default (uniform +-1/sqrt(fan_in)); the LM re-inits GPT-style.
        nn.init.uniform_(self.w_in, -1 / math.sqrt(self.dim), 1 / math.sqrt(self.dim))
        nn.init.uniform_(self.w_out, -1 / math.sqrt(self.hidden), 1 / math.sqrt(self.hidden))
        self.router.reset_parameters()

    def expert_parameters(self) -> list[nn.Parameter]:
        """The sparse part: only top-k of E experts' weights are used per token."""
        return [self.w_in, self.w_out]

    def aux_loss(self) -> torch.Tensor:
        """Balance loss of the last forward (a zero scalar before any forward)."""
        if self._aux is None:
            return self.w_in.new_zeros(())
        return self._aux

    def route(self, x_TD: torch.Tensor):
        """Returns (probs_TE fp32, weights_TK fp32, expert ids_TK long)."""
        probs_TE = F.softmax(self.router(x_TD).float(), dim=-1)
        w_TK, ids_TK = probs_TE.topk(self.topk, dim=-1)
        if self.renormalize:
            w_TK = w_TK / w_TK.sum(-1, keepdim=True)
        return probs_TE, w_TK, ids_TK

    def forward(self, x_BTD: torch.Tensor, path: str = "auto") -> torch.Tensor:
        """path: "auto" (gather for decode-size batches, see class doc), "grouped" or "gather"."""
        if path not in ("auto", "grouped", "gather"):
            raise ValueError(f"MoE path must be 'auto', 'grouped' or 'gather', got {path!r}")
        shape = x_BTD.shape
        x_TD = x_BTD.reshape(-1, self.dim)
        probs_TE, w_TK, ids_TK = self.route(x_TD)
        self._aux = self._balance_loss(probs_TE, ids_TK)
        if self.record_routing:
            self.last_expert_ids = ids_TK.detach()
        if path == "gather" or (path == "auto" and self._gather_is_cheaper(ids_TK.numel())):
            y_TKD = self._gather_experts(x_TD, ids_TK)
        else:
            y_TKD = self._grouped_experts(x_TD, ids_TK)
        # Mix the K expert outputs per token; one batched matmul, no scatter-add (deterministic).
        y_TD = torch.bmm(w_TK.to(y_TKD.dtype).unsqueeze(1), y_TKD).squeeze(1)
        return y_TD.reshape(shape)

    def _gather_is_cheaper(self, pairs: int) -> bool:
        expert_bytes = (self.w_in[0].numel() + self.w_out[0].numel()) * self.w_in.element_size()
        return pairs * expert_bytes <= self.decode_max_bytes

    def _balance_loss(self, probs_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        if probs_TE.shape[0] == 0:
            return probs_TE.new_zeros(())
        counts_E = torch.bincount(ids_TK.flatten(), minlength=self.num_experts)
        f_E = counts_E.float() / ids_TK.numel()
        p_E = probs_TE.mean(0)
        return self.balance_coef * self.num_experts * (f_E * p_E).sum()

    def _gather_experts(self, x_TD: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        n, k = ids_TK.shape
        ids_A = ids_TK.flatten()
        x_A1D = x_TD.repeat_interleave(k, dim=0).unsqueeze(1)
        gate, up = torch.bmm(x_A1D, self.w_in.index_select(0, ids_A)).chunk(2, dim=-1)
        y_A1D = torch.bmm(F.silu(gate) * up, self.w_out.index_select(0, ids_A))
        return y_A1D.reshape(n, k, self.dim)

    def _grouped_experts(self, x_TD: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        n, k = ids_TK.shape
        ids_A = ids_TK.flatten()
        order_A = torch.argsort(ids_A, stable=True)
        counts_E = torch.bincount(ids_A, minlength=self.num_experts)
        x_AD = x_TD[order_A // k]  # pair s of token t sits at flat index t*k + slot
        gate, up = grouped_matmul(x_AD, self.w_in, counts_E).chunk(2, dim=-1)
        y_AD = grouped_matmul(F.silu(gate) * up, self.w_out, counts_E)
        inverse_A = torch.empty_like(order_A)
        inverse_A[order_A] = torch.arange(order_A.numel(), device=order_A.device)
        return y_AD[inverse_A].reshape(n, k, self.dim)


def grouped_matmul(x_AD: torch.Tensor, w_EDF: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Rows of x_AD sorted by group (counts_E rows each) times their group's (D, F) weight."""
    if x_AD.dtype != w_EDF.dtype and torch.is_autocast_enabled(x_AD.device.type):
        w_EDF = w_EDF.to(x_AD.dtype)  # what autocast does for a plain matmul
    if _grouped_mm_ok(x_AD, w_EDF):
        offs_E = counts_E.cumsum(0).to(torch.int32)
        return F.grouped_mm(x_AD, w_EDF, offs=offs_E)
    return grouped_matmul_loop(x_AD, w_EDF, counts_E)


def grouped_matmul_loop(x_AD: torch.Tensor, w_EDF: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Fallback: one matmul per non-empty group (a loop over experts, not tokens)."""
    # unbind once: indexing w_EDF[e] per expert would make backward build E full-size zero grads
    outs, start, w_list = [], 0, w_EDF.unbind(0)
    for e, c in enumerate(counts_E.tolist()):
        if c:
            outs.append(x_AD[start:start + c] @ w_list[e])
            start += c
    if not outs:
        return x_AD.new_zeros(0, w_EDF.shape[-1])
    return torch.cat(outs)


def _grouped_mm_ok(x_AD: torch.Tensor, w_EDF: torch.Tensor) -> bool:
    # F.grouped_mm (torch >= 2.8): fp32/bf16/fp16 on CPU, bf16 on CUDA with SM >= 80; 16-byte
    # aligned strides. Anything else takes the loop.
    if not hasattr(F, "grouped_mm") or x_AD.dtype != w_EDF.dtype or x_AD.shape[0] == 0:
        return False
    if x_AD.device.type == "cuda":
        if x_AD.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x_AD.device) < (8, 0):
            return False
    elif x_AD.device.type != "cpu" or x_AD.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    align = 16 // x_AD.element_size()
    return (x_AD.is_contiguous() and w_EDF.is_contiguous()
            and x_AD.shape[-1] % align == 0 and w_EDF.shape[-1] % align == 0)


def _check_positive(**kwargs: int) -> None:
    for name, value in kwargs.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
