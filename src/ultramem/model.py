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
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import CausalSelfAttention, KVCache, rotary_tables
from .config import PKMConfig, UltraMemConfig
from .ffn import MoE, SwiGLU
from .layers import PKMLayer, UltraMemLayer
from .memory import MemoryLayer

FFN_KINDS = ("dense", "moe", "pkm", "ultramem")
MEMORY_KINDS = {"pkm": (PKMConfig, PKMLayer), "ultramem": (UltraMemConfig, UltraMemLayer)}
IGNORE_INDEX = -100  # targets with this value do not count in the loss (PyTorch's default)


@dataclass(frozen=True)
class LMConfig:
    """Model shape. `memory` holds UltraMemConfig/PKMConfig fields (a dict, or a config object);
    the model always sets the memory's `dim` to `dim` and `depth` to `n_layers`."""

    vocab_size: int = 256
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ffn_hidden: int | None = None  # SwiGLU width; default 8/3 * dim rounded up to a multiple of 8
    max_seq_len: int = 256
    ffn: str = "dense"  # one of FFN_KINDS
    moe_experts: int = 8
    moe_topk: int = 2
    moe_hidden: int | None = None  # width of each expert; default ffn_hidden
    moe_balance_coef: float = 0.01
    memory_placement: str = ""  # "i:j/i:j" for ffn "pkm" / "ultramem"; empty otherwise
    memory: dict = field(default_factory=dict)
    tie_embeddings: bool = True
    dropout: float = 0.0
    rope_theta: float = 10000.0

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "moe_experts", "moe_topk"):
            _positive_int(name, getattr(self, name))
        for name in ("ffn_hidden", "moe_hidden"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"ffn: must be one of {FFN_KINDS} (got {self.ffn!r})")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"n_heads: dim / n_heads must be an even integer for rotary "
                             f"(dim={self.dim}, got n_heads={self.n_heads})")
        if self.moe_topk > self.moe_experts:
            raise ValueError(f"moe_topk: must be <= moe_experts={self.moe_experts} (got {self.moe_topk})")
        if self.moe_balance_coef < 0:
            raise ValueError(f"moe_balance_coef: must be >= 0 (got {self.moe_balance_coef})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: must be in [0, 1) (got {self.dropout})")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta: must be > 0 (got {self.rope_theta})")
        if self.ffn_hidden is None:
            object.__setattr__(self, "ffn_hidden", 8 * math.ceil(8 * self.dim / 3 / 8))
        if dataclasses.is_dataclass(self.memory):
            object.__setattr__(self, "memory", dataclasses.asdict(self.memory))
        if not isinstance(self.memory, dict):
            raise ValueError(f"memory: must be a dict of memory-config fields "
                             f"(got {type(self.memory).__name__})")
        if self.ffn in MEMORY_KINDS:
            if not self.memory_placement:
                raise ValueError(f"memory_placement: required for ffn={self.ffn!r}, e.g. '0:1/2:3' (got '')")
            parse_placement(self.memory_placement, self.n_layers)
            self.memory_config()  # validates the memory fields now, not at model build
        elif self.memory_placement:
            raise ValueError(f"memory_placement: only used with ffn 'pkm' or 'ultramem' "
                             f"(ffn={self.ffn!r}, got {self.memory_placement!r})")

    @property
    def expert_hidden(self) -> int:
        return self.moe_hidden if self.moe_hidden is not None else self.ffn_hidden

    def memory_config(self) -> UltraMemConfig | PKMConfig:
        cls = MEMORY_KINDS[self.ffn][0]
        fields = dict(self.memory)
        for key in ("dim", "dim_out"):
            if fields.get(key) not in (None, self.dim):
                raise ValueError(f"memory.{key}: must equal the model dim {self.dim} (got {fields[key]})")
        fields.update(dim=self.dim, depth=self.n_layers)
        return cls.from_dict(fields)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LMConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"LMConfig: unknown field(s) {unknown}; allowed: {sorted(names)}")
        return cls(**d)


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
            mcfg, layer_cls = cfg.memory_config(), MEMORY_KINDS[cfg.ffn][1]
            self.memory.extend(layer_cls(mcfg) for _ in self.spans)
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

    def _memory_forward(self, i: int, u_BTD: torch.Tensor, kv_cache: KVCache | None) -> torch.Tensor:
        """Memory i on the normed hidden state; with a KV cache its decode state lives there too."""
        mem = self.memory[i]
        if kv_cache is None:
            return mem(u_BTD)
        if i not in kv_cache.memory_state:
            kv_cache.memory_state[i] = mem.new_state()
        return mem(u_BTD, kv_cache.memory_state[i])

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
        return [p for m in self.memory for p in m.value_parameters()]

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
        if temperature < 0:
            raise ValueError(f"temperature: must be >= 0 (got {temperature})")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k: must be None or a positive int (got {top_k!r})")
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


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be a positive int (got {value!r})")
