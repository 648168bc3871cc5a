"""Decoder-only language model with a dense, MoE, PKM or UltraMem feed-forward side.

Shape legend: B batch, T time, D model width, V vocabulary.

Memory layers (ffn "pkm" or "ultramem") are placed by a spec string "i:j/i:j/..." (0-indexed
blocks): the layer reads block i's pre-FFN normed hidden state (the very tensor block i's FFN
reads) and its output is added to the residual stream after block j (after j's FFN). i == j
means the same block, i.e. a memory beside that block's FFN. Spans are closed intervals and must
not overlap. Every block keeps its dense SwiGLU FFN: the memory is added beside it, as in the
paper's setup where memory layers are inserted into a dense model and take over part of the
FFN's parameter budget (matched-size presets shrink ffn_hidden, not this module).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import CausalSelfAttention, KVCache, rotary_tables
from .confbase import ConfigBase, fail, param
from .config import PKMConfig, UltraMemConfig
from .ffn import MoE, SwiGLU
from .layers import PKMLayer, UltraMemLayer
from .memory import MemoryLayer
from .v2 import UltraMemV2Config, UltraMemV2Layer, build_layers, ffn_hidden_for_ratio

MEMORY_KINDS = {"pkm": (PKMConfig, PKMLayer), "ultramem": (UltraMemConfig, UltraMemLayer),
                "ultramem_v2": (UltraMemV2Config, UltraMemV2Layer)}
IGNORE_INDEX = -100  # targets with this value do not count in the loss (PyTorch's default)


FFNKind = Literal["dense", "moe", "pkm", "ultramem", "ultramem_v2"]
FFN_KINDS = typing.get_args(FFNKind)


@dataclass(frozen=True)
class LMConfig(ConfigBase):
    """Model shape. `memory` is the memory layer's config (UltraMemConfig / PKMConfig for ffn
    "ultramem" / "pkm"; a dict of its fields is converted); the model always sets the memory's
    `dim` to `dim` and `depth` to `n_layers`."""

    vocab_size: int = param(256, "vocabulary size (a run takes it from its tokenizer)", ge=1)
    dim: int = param(128, "model width D", ge=1)
    n_layers: int = param(4, "transformer blocks", ge=1)
    n_heads: int = param(4, "attention heads (dim / n_heads even, for rotary)", ge=1)
    ffn_hidden: int | None = param(None, "SwiGLU width (null: 8/3 dim rounded up to a multiple of 8)", ge=1)
    max_seq_len: int = param(256, "positions (a run raises it to fit train.seq_len and the fact prompts)",
                             ge=1)
    ffn: FFNKind = param("dense", "`dense`, `moe`, `pkm` or `ultramem` (memory layers beside the FFNs)")
    moe_experts: int = param(8, "MoE experts", ge=1)
    moe_topk: int = param(2, "experts per token", ge=1)
    moe_hidden: int | None = param(None, "width of each expert (null: `ffn_hidden`)", ge=1)
    moe_balance_coef: float = param(0.01, "Switch balance-loss coefficient", ge=0)
    memory_placement: str = param("", "`i:j/i:j`: memory reads block i's normed FFN input, adds after "
                                  "block j (ffn `pkm`/`ultramem` only)")
    memory: ConfigBase | None = param(None, "the memory layer's config (a table of UltraMemConfig or "
                                      "PKMConfig fields; `dim`/`depth` are set by the model)")
    tie_embeddings: bool = param(True, "output head = token embedding")
    dropout: float = param(0.0, "dropout probability", ge=0, lt=1)
    rope_theta: float = param(10000.0, "rotary base", gt=0)
    memory_compute_ratio: float | None = param(None, "ffn `ultramem_v2` only: the memory's share of "
                                               "(memory + FFN) FLOPs per token; sets `ffn_hidden`",
                                               gt=0, lt=1)

    def __post_init__(self):
        if self.ffn == "ultramem_v2":  # UltraMemV2: a memory beside every block's FFN
            _v2_defaults(self)
        if self.ffn_hidden is None:
            object.__setattr__(self, "ffn_hidden", 8 * math.ceil(8 * _int_or_zero(self.dim) / 3 / 8) or None)
        object.__setattr__(self, "memory", self._memory_config())
        super().__post_init__()

    def _memory_config(self) -> ConfigBase | None:
        """The memory field as the right config object (a dict or config of the wrong dims is fixed
        up or refused here, so a bad memory field fails at config time, not at model build)."""
        if self.ffn not in FFN_KINDS:  # the memory's class depends on ffn: check ffn first
            fail("ffn", f"must be one of {list(FFN_KINDS)}", self.ffn)
        mem = self.memory
        if dataclasses.is_dataclass(mem) and isinstance(mem, ConfigBase):
            mem = mem.to_dict()
        if mem is None or (isinstance(mem, dict) and not mem and self.ffn not in MEMORY_KINDS):
            return None
        if not isinstance(mem, dict):
            fail("memory", "must be a table of memory-config fields", mem)
        if self.ffn not in MEMORY_KINDS:
            fail("memory", f"only used with ffn in {sorted(MEMORY_KINDS)} (ffn={self.ffn!r})", mem)
        for key in ("dim", "dim_out"):
            if mem.get(key) not in (None, self.dim):
                fail(f"memory.{key}", f"must equal the model dim {self.dim}", mem[key])
        fields = {**mem, "dim": self.dim, "depth": self.n_layers}
        if self.ffn == "ultramem_v2" and fields.get("ffn_hidden") is None:
            fields["ffn_hidden"] = self.ffn_hidden  # V2's init matches this FFN's output variance
        try:
            return MEMORY_KINDS[self.ffn][0].from_dict(fields)
        except ValueError as e:
            raise ValueError(f"memory.{e}") from None

    def validate(self):
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            fail("n_heads", f"dim / n_heads must be an even integer for rotary (dim={self.dim})",
                 self.n_heads)
        if self.moe_topk > self.moe_experts:
            fail("moe_topk", f"must be <= moe_experts={self.moe_experts}", self.moe_topk)
        every = "/".join(f"{i}:{i}" for i in range(self.n_layers))
        if self.ffn == "ultramem_v2" and self.memory_placement != every:
            fail("memory_placement", f"ffn 'ultramem_v2' puts a memory beside every block's FFN; leave "
                 f"it empty or give {every!r}", self.memory_placement)
        if self.ffn != "ultramem_v2" and self.memory_compute_ratio is not None:
            fail("memory_compute_ratio", f"only used with ffn 'ultramem_v2' (ffn={self.ffn!r})",
                 self.memory_compute_ratio)
        if self.ffn in MEMORY_KINDS:
            if not self.memory_placement:
                fail("memory_placement", f"required for ffn={self.ffn!r}, e.g. '0:1/2:3'", "")
            parse_placement(self.memory_placement, self.n_layers)
        elif self.memory_placement:
            fail("memory_placement", f"only used with ffn in {sorted(MEMORY_KINDS)} (ffn={self.ffn!r})",
                 self.memory_placement)

    @property
    def expert_hidden(self) -> int:
        return self.moe_hidden if self.moe_hidden is not None else self.ffn_hidden

    def memory_config(self) -> ConfigBase | None:
        """The memory layer's config (None without memory layers)."""
        return self.memory


def _v2_defaults(cfg: LMConfig) -> None:
    """ffn "ultramem_v2": placement defaults to every block (i:i), memory to V2's defaults, and
    memory_compute_ratio sets ffn_hidden (ill-typed fields are left for `check_fields` to name)."""
    n = _int_or_zero(cfg.n_layers)
    if cfg.memory_placement == "" and n:
        object.__setattr__(cfg, "memory_placement", "/".join(f"{i}:{i}" for i in range(n)))
    if cfg.memory is None:
        object.__setattr__(cfg, "memory", {})
    ratio, mem = cfg.memory_compute_ratio, cfg.memory
    if dataclasses.is_dataclass(mem) and isinstance(mem, ConfigBase):
        mem = mem.to_dict()
    valid = isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 < ratio < 1
    if not (valid and isinstance(mem, dict) and n and _int_or_zero(cfg.dim)):
        return
    try:
        hidden = ffn_hidden_for_ratio(mem, cfg.dim, n, ratio)
    except (TypeError, ValueError) as e:
        raise ValueError(f"memory.{e}") from None
    if cfg.ffn_hidden not in (None, hidden):  # equal is fine: to_dict() -> from_dict() round trips
        fail("ffn_hidden", f"memory_compute_ratio={ratio} sets it to {hidden}; give one of the two",
             cfg.ffn_hidden)
    object.__setattr__(cfg, "ffn_hidden", hidden)


def _int_or_zero(v) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def parse_placement(spec: str, n_layers: int) -> list[tuple[int, int]]:
    """"i:j/i:j" -> sorted [(i, j), ...]; 0 <= i <= j < n_layers; closed spans may not overlap."""
    rule = f"expected 'i:j' spans joined by '/', with 0 <= i <= j < n_layers={n_layers}"
    spans = []
    for part in spec.split("/"):
        ends = part.strip().split(":")
        if len(ends) != 2 or not all(e.strip().lstrip("-").isdigit() for e in ends):
            raise ValueError(f"memory_placement: malformed span {part!r} in {spec!r}; {rule}")
        i, j = int(ends[0]), int(ends[1])
        if not 0 <= i <= j < n_layers:
            raise ValueError(f"memory_placement: span {part.strip()!r} out of range; {rule}")
        spans.append((i, j))
    spans.sort()
    for (i0, j0), (i1, j1) in zip(spans, spans[1:], strict=False):
        if i1 <= j0:
            raise ValueError(f"memory_placement: spans {i0}:{j0} and {i1}:{j1} overlap in {spec!r}")
    return spans


class Block(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.dim, eps=1e-6)
        self.attn = CausalSelfAttention(cfg.dim, cfg.n_heads, cfg.dropout)
        self.norm2 = nn.RMSNorm(cfg.dim, eps=1e-6)
        if cfg.ffn == "moe":
            self.ffn = MoE(cfg.dim, cfg.expert_hidden, cfg.moe_experts, cfg.moe_topk, cfg.moe_balance_coef)
        else:
            self.ffn = SwiGLU(cfg.dim, cfg.ffn_hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BTD, cos, sin, kv_cache=None, layer=0):
        """Returns (new residual stream, the normed FFN input) so memories can read the latter."""
        x_BTD = x_BTD + self.drop(self.attn(self.norm1(x_BTD), cos, sin, kv_cache, layer))
        u_BTD = self.norm2(x_BTD)
        return x_BTD + self.drop(self.ffn(u_BTD)), u_BTD


class LanguageModel(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = nn.RMSNorm(cfg.dim, eps=1e-6)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.spans = parse_placement(cfg.memory_placement, cfg.n_layers) if cfg.ffn in MEMORY_KINDS else []
        self.memory = nn.ModuleList()
        if self.spans:
            layer_cls = MEMORY_KINDS[cfg.ffn][1]
            if cfg.ffn == "ultramem_v2":  # shared value pools: the layers are built together
                self.memory.extend(build_layers(cfg.memory, len(self.spans)))
            else:
                self.memory.extend(layer_cls(cfg.memory) for _ in self.spans)
        self._reads = {i: n for n, (i, _) in enumerate(self.spans)}
        self._writes = {j: n for n, (_, j) in enumerate(self.spans)}
        cos, sin = rotary_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-style init of every tensor outside the memory layers (which keep their own init).

        - token embedding (also the output head when tied): N(0, 0.02^2);
        - untied output head: N(0, 0.02^2);
        - attention qkv, SwiGLU w_in (gate|up), MoE router and expert w_in: N(0, 0.02^2);
        - residual output projections (attention proj, SwiGLU w_down, MoE expert w_out):
          N(0, (0.02 / sqrt(2 * n_layers))^2), so the residual stream's variance does not grow
          with depth;
        - RMSNorm gains: 1.
        """
        std, out_std = 0.02, 0.02 / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_emb.weight, std=std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=std)
        for blk in self.blocks:
            nn.init.normal_(blk.attn.qkv.weight, std=std)
            nn.init.normal_(blk.attn.proj.weight, std=out_std)
            if isinstance(blk.ffn, MoE):
                nn.init.normal_(blk.ffn.router.weight, std=std)
                nn.init.normal_(blk.ffn.w_in, std=std)
                nn.init.normal_(blk.ffn.w_out, std=out_std)
            else:
                nn.init.normal_(blk.ffn.w_in.weight, std=std)
                nn.init.normal_(blk.ffn.w_down.weight, std=out_std)
            for norm in (blk.norm1, blk.norm2):
                nn.init.ones_(norm.weight)
        nn.init.ones_(self.norm_f.weight)

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        return KVCache(self.cfg.n_layers, batch_size, max_len or self.cfg.max_seq_len)

    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, last_only: bool = False):
        """Returns (logits, loss). logits: (B, T, V), or (B, 1, V) with last_only=True.

        loss: mean cross-entropy over targets != IGNORE_INDEX (None without targets); the auxiliary
        losses are not included (add `aux_loss()`). With a kv_cache, idx_BT holds the next
        positions after the cached ones; the cache is advanced by T.
        """
        if idx_BT.ndim != 2 or idx_BT.dtype not in (torch.long, torch.int32):
            raise ValueError(f"idx: expected (batch, time) integer token ids, got {tuple(idx_BT.shape)} "
                             f"{idx_BT.dtype}")
        B, T = idx_BT.shape
        if B * T == 0:  # an empty batch or sequence: empty logits of the right shape, no loss
            return self._empty_forward(idx_BT, targets_BT, last_only)
        past = kv_cache.pos if kv_cache is not None else 0
        if past + T > self.cfg.max_seq_len:
            raise ValueError(f"idx: {past} cached + {T} new positions exceed "
                             f"max_seq_len={self.cfg.max_seq_len}")
        if kv_cache is not None:
            self._check_cache(kv_cache, B, past + T)
        cos, sin = self.rope_cos[past:past + T], self.rope_sin[past:past + T]
        x_BTD = self.drop(self.tok_emb(idx_BT))
        pending = None
        for n, blk in enumerate(self.blocks):
            x_BTD, u_BTD = blk(x_BTD, cos, sin, kv_cache, n)
            if n in self._reads:
                pending = self._memory_forward(self._reads[n], u_BTD, kv_cache)
            if n in self._writes:
                x_BTD = x_BTD + self.drop(pending.to(x_BTD.dtype))
                pending = None
        if kv_cache is not None:
            kv_cache.advance(T)
        x_BTD = self.norm_f(x_BTD)
        if last_only:
            x_BTD = x_BTD[:, -1:]
        head = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits_BTV = F.linear(x_BTD, head)
        loss = None
        if targets_BT is not None:
            loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten(),
                                   ignore_index=IGNORE_INDEX)
        return logits_BTV, loss

    def _empty_forward(self, idx_BT: torch.Tensor, targets_BT, last_only: bool):
        B, T = idx_BT.shape
        if last_only and T == 0:
            raise ValueError("idx: an empty sequence has no last position to predict from (got time 0)")
        logits = self.tok_emb.weight.new_zeros(B, 1 if last_only else T, self.cfg.vocab_size)
        # the mean over no tokens is undefined: NaN, as F.cross_entropy gives for an empty batch
        loss = None if targets_BT is None else logits.new_full((), float("nan"))
        return logits, loss

    def _memory_forward(self, i: int, u_BTD: torch.Tensor, kv_cache: KVCache | None) -> torch.Tensor:
        """Memory i on the normed hidden state; with a KV cache its decode state lives there too."""
        mem = self.memory[i]
        if kv_cache is None:
            return mem(u_BTD)
        if i not in kv_cache.memory_state:
            kv_cache.memory_state[i] = mem.new_state()
        return mem(u_BTD, kv_cache.memory_state[i])

    def _check_prompt(self, idx_BT: torch.Tensor) -> None:
        if idx_BT.ndim != 2 or idx_BT.dtype not in (torch.long, torch.int32):
            raise ValueError(f"idx: expected (batch, time) integer token ids, got {tuple(idx_BT.shape)} "
                             f"{idx_BT.dtype}")
        if idx_BT.shape[1] == 0:
            raise ValueError("idx: the prompt is empty; generate needs at least one token to start from "
                             "(e.g. the tokenizer's <|endoftext|>)")
        if idx_BT.numel() and (int(idx_BT.min()) < 0 or int(idx_BT.max()) >= self.cfg.vocab_size):
            raise ValueError(f"idx: token ids must lie in [0, vocab_size={self.cfg.vocab_size}) (got "
                             f"{int(idx_BT.min())}..{int(idx_BT.max())}); was the prompt encoded with "
                             "another tokenizer than the model's?")

    def _check_cache(self, kv_cache: KVCache, batch: int, end: int) -> None:
        if kv_cache.batch_size != batch or end > kv_cache.max_len:
            raise ValueError(f"kv_cache: holds {kv_cache.batch_size} sequences of {kv_cache.max_len} "
                             f"positions; got batch {batch} reaching position {end}")

    def memory_layers(self) -> list[MemoryLayer]:
        return list(self.memory)

    def moe_layers(self) -> list[MoE]:
        return [blk.ffn for blk in self.blocks if isinstance(blk.ffn, MoE)]

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Auxiliary losses of the last forward by kind (only the kinds this model has)."""
        out = {}
        if self.moe_layers():
            out["moe_balance"] = sum(m.aux_loss() for m in self.moe_layers())
        if self.spans:
            out["memory_core"] = sum(m.aux_loss() for m in self.memory)
        return out

    def aux_loss(self) -> torch.Tensor:
        return sum(self.aux_losses().values(), self.tok_emb.weight.new_zeros(()))

    def after_optimizer_step(self) -> None:
        """Every memory layer's post-step hook (the Tucker refresh); the trainer calls it once a step."""
        for m in self.memory:
            m.after_optimizer_step()

    def refresh_tucker(self) -> None:
        """The 0.1 name of `after_optimizer_step` (kept)."""
        self.after_optimizer_step()

    def value_parameters(self) -> list[nn.Parameter]:
        """Every memory's value tensors, once each (UltraMemV2 layers share pools)."""
        return list({id(p): p for m in self.memory for p in m.value_parameters()}.values())

    @torch.no_grad()
    def generate(self, idx_BT: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, eos_id: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample continuations with the KV cache (in eval mode; the mode is restored after).

        temperature 0 means greedy. After a sequence emits eos_id it is padded with eos_id, and
        generation stops early once every sequence has. Returns (B, T + new tokens) ids.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: must be an int >= 0 (got {max_new_tokens!r})")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature: must be a finite number >= 0 (got {temperature!r})")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k: must be None or a positive int (got {top_k!r})")
        self._check_prompt(idx_BT)
        B, T = idx_BT.shape
        if T + max_new_tokens > self.cfg.max_seq_len:
            raise ValueError(f"max_new_tokens: prompt {T} + {max_new_tokens} new tokens exceed "
                             f"max_seq_len={self.cfg.max_seq_len}")
        was_training = self.training
        self.eval()
        try:
            cache = self.new_kv_cache(B, T + max_new_tokens)
            out, done = [idx_BT], torch.zeros(B, dtype=torch.bool, device=idx_BT.device)
            logits, _ = self(idx_BT, kv_cache=cache, last_only=True)
            for step in range(max_new_tokens):
                nxt_B = sample_next(logits[:, -1], temperature, top_k, generator)
                if eos_id is not None:
                    nxt_B = torch.where(done, torch.full_like(nxt_B, eos_id), nxt_B)
                    done |= nxt_B == eos_id
                out.append(nxt_B[:, None])
                if step == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
                    break
                logits, _ = self(nxt_B[:, None], kv_cache=cache, last_only=True)
            return torch.cat(out, dim=1)
        finally:
            self.train(was_training)


def sample_next(logits_BV: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    if temperature == 0:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits_BV, dim=-1), 1, generator=generator).squeeze(-1)
