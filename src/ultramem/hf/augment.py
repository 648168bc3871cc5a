"""`add_memory`: UltraMem (or PKM) memory layers inserted into an existing HF causal LM.

A span "i:j" reads block i's normed hidden state (the output of its pre-MLP norm, i.e. exactly
what block i's MLP reads: Llama/Qwen2/Mistral `post_attention_layernorm`, GPT-2 `ln_2`, our own
`UltraMemForCausalLM` `norm2`) and adds
the memory's output to the residual stream after block j, as in `ultramem.model`. The memory's
output projection (or, without one, its values) starts at zero, so the logits are unchanged
until the memory is trained.

Saving and loading: the model's class and config class are switched in place to registered
subclasses (e.g. `UltraMemLlamaForCausalLM` / `UltraMemLlamaConfig`, model_type
"ultramem_llama") whose config carries `ultramem_memory = {"kind", "config", "placement"}`. After
`import ultramem.hf`, `AutoModelForCausalLM.from_pretrained(path)` builds that subclass, which
re-attaches the memory from the config before the weights are loaded.

Hooks are small callable classes (not closures), so an augmented model deep-copies and pickles
with its hooks pointing at its own memory.

Shape legend: B batch, T time, D model width.
"""

from __future__ import annotations

import dataclasses
import sys

import torch
from torch import nn

from ..config import PKMConfig, UltraMemConfig
from ..layers import PKMLayer, UltraMemLayer
from ..memory import memory_layers
from ..model import parse_placement
from .modeling import UltraMemForCausalLM

MEMORY_KINDS = {"ultramem": (UltraMemConfig, UltraMemLayer), "pkm": (PKMConfig, PKMLayer)}
ATTACHMENT = "ultramem_memory"
ZERO_KINDS = ("output", "values")  # attribute of the model (and of its config) holding the memory


def _families() -> dict[type, tuple[str, str, str]]:
    """Supported HF class -> (family tag, path of the block list, name of the pre-MLP norm)."""
    import transformers as tf

    table = {"LlamaForCausalLM": ("Llama", "model.layers", "post_attention_layernorm"),
             "MistralForCausalLM": ("Mistral", "model.layers", "post_attention_layernorm"),
             "Qwen2ForCausalLM": ("Qwen2", "model.layers", "post_attention_layernorm"),
             "Qwen3ForCausalLM": ("Qwen3", "model.layers", "post_attention_layernorm"),
             "GPT2LMHeadModel": ("GPT2", "transformer.h", "ln_2")}
    out = {getattr(tf, name): spec for name, spec in table.items() if hasattr(tf, name)}
    # Our own LM: Block.forward returns (hidden, normed FFN input); norm2 is its pre-FFN norm.
    out[UltraMemForCausalLM] = ("UltraMemLM", "model.blocks", "norm2")
    return out


FAMILIES = _families()


# ---------------------------------------------------------------- the attached memory

class _ReadHook:
    """Forward hook on block i's pre-MLP norm: runs memory n on the normed hidden state."""

    def __init__(self, attachment: MemoryAttachment, n: int):
        self.attachment, self.n = attachment, n

    def __call__(self, module, args, u_BTD):
        self.attachment.pending[self.n] = self.attachment.layers[self.n](u_BTD)


class _WriteHook:
    """Forward hook on block j: adds memory n's output to the block's output hidden state."""

    def __init__(self, attachment: MemoryAttachment, n: int):
        self.attachment, self.n = attachment, n

    def __call__(self, module, args, out):
        y_BTD = self.attachment.pending.pop(self.n)
        if isinstance(out, tuple):  # older block forwards return (hidden, ...)
            return (out[0] + y_BTD.to(out[0].dtype),) + out[1:]
        return out + y_BTD.to(out.dtype)


class MemoryAttachment(nn.Module):
    """The memory layers of an augmented model, their spans, and the hooks that wire them in."""

    def __init__(self, kind: str, mcfg, spans: list[tuple[int, int]]):
        super().__init__()
        self.kind, self.spans = kind, spans
        self.layers = nn.ModuleList(MEMORY_KINDS[kind][1](mcfg) for _ in spans)
        self.pending: dict[int, torch.Tensor] = {}
        self.handles: list = []

    def install(self, blocks: nn.ModuleList, norm_name: str) -> None:
        for n, (i, j) in enumerate(self.spans):
            self.handles.append(getattr(blocks[i], norm_name).register_forward_hook(_ReadHook(self, n)))
            self.handles.append(blocks[j].register_forward_hook(_WriteHook(self, n)))

    @torch.no_grad()
    def zero_init(self, zero: str = "output") -> None:
        """Make every memory's output exactly zero, so an added memory leaves the logits alone.

        "output": zero the output projection (without one, PKM's values); everything in the memory
        then learns from the first steps on. "values": zero the value table and keep the rest, so
        gradients reach only the value rows a token reads (sparse updates) and nothing else at first.
        """
        for layer in self.layers:
            w_o = getattr(layer, "w_o", None)
            if zero == "output" and w_o is not None:
                w_o.weight.zero_()
            else:
                for p in layer.values.parameters():
                    p.zero_()

    def forward(self, *args, **kwargs):
        raise RuntimeError("MemoryAttachment runs through hooks on the model's blocks, not on its own")


# ---------------------------------------------------------------- config handling

def memory_entry(memory_config, placement: str) -> dict:
    """The `ultramem_memory` config entry: {"kind", "config" (fields, dim/depth set later), "placement"}."""
    if isinstance(memory_config, UltraMemConfig | PKMConfig):
        kind = "ultramem" if isinstance(memory_config, UltraMemConfig) else "pkm"
        fields = dataclasses.asdict(memory_config)
    elif isinstance(memory_config, dict):
        fields = dict(memory_config)
        kind = fields.pop("kind", "ultramem")
        if kind not in MEMORY_KINDS:
            raise ValueError(f"memory_config.kind: must be one of {sorted(MEMORY_KINDS)} (got {kind!r})")
    else:
        raise ValueError(f"memory_config: expected an UltraMemConfig, PKMConfig or dict of its fields "
                         f"(got {type(memory_config).__name__})")
    if not isinstance(placement, str) or not placement.strip():
        raise ValueError(f"placement: expected 'i:j' spans joined by '/', e.g. '1:2' (got {placement!r})")
    return {"kind": kind, "config": fields, "placement": placement}


def _resolve(entry: dict, hidden: int, n_layers: int):
    """(memory config with the model's width and depth, spans); ValueError on a mismatch."""
    kind, fields = entry["kind"], dict(entry["config"])
    for key in ("dim", "dim_out"):
        if fields.get(key) not in (None, hidden):
            raise ValueError(f"memory_config.{key}: must equal the model's hidden size {hidden} "
                             f"(got {fields[key]})")
    fields.update(dim=hidden, depth=n_layers)
    mcfg = MEMORY_KINDS[kind][0].from_dict(fields)
    if kind == "ultramem" and mcfg.query_conv:
        raise ValueError("memory_config.query_conv: not supported by add_memory (an HF cache carries "
                         "no memory decode state, so cached generation would differ) (got True)")
    try:
        spans = parse_placement(entry["placement"], n_layers)
    except ValueError as e:
        raise ValueError(str(e).replace("memory_placement", "placement", 1)) from None
    return mcfg, spans


def _family(model) -> tuple[str, str, str]:
    base = getattr(type(model), "_ultramem_base", type(model))
    if base not in FAMILIES:
        names = sorted(c.__name__ for c in FAMILIES)
        raise ValueError(f"model: unsupported architecture {type(model).__name__} for add_memory; "
                         f"supported are {names}")
    return FAMILIES[base]


def _blocks(model, path: str) -> nn.ModuleList:
    node = model
    for part in path.split("."):
        node = getattr(node, part)
    return node


def attach(model, entry: dict, zero: str = "output") -> MemoryAttachment:
    """Build the memory described by `entry`, register it on `model` and hook it in."""
    _, path, norm_name = _family(model)
    blocks = _blocks(model, path)
    mcfg, spans = _resolve(entry, model.config.hidden_size, len(blocks))
    ref = next(model.parameters())
    # from_pretrained builds models under torch.device("meta"); UltraMem's init computes (an SVD,
    # a Monte-Carlo gain), so the memory is built on the CPU there and replaced by the loaded weights.
    device = "cpu" if ref.device.type == "meta" or torch.empty(0).device.type == "meta" else ref.device
    with torch.device(device):
        att = MemoryAttachment(entry["kind"], mcfg, spans)
    att.zero_init(zero)
    att.train(model.training)  # a BatchNorm query norm (PKM) must follow the model's mode
    att.to(dtype=ref.dtype)
    if ref.device.type != "meta":
        att.to(ref.device)
    setattr(model, ATTACHMENT, att)
    att.install(blocks, norm_name)
    return att


# ---------------------------------------------------------------- public API

def add_memory(model, memory_config, placement: str, zero: str = "output"):
    """Insert memory layers into `model` (in place; also returned). See the module doc.

    memory_config: UltraMemConfig / PKMConfig, or a dict of UltraMemConfig fields (optionally with
    "kind": "pkm"); its dim and depth are set from the model. placement: "i:j/i:j" block spans.
    zero: what starts at zero, "output" (projection) or "values" (table); see MemoryAttachment."""
    if zero not in ZERO_KINDS:
        raise ValueError(f"zero: must be one of {ZERO_KINDS} (got {zero!r})")
    _family(model)
    if getattr(model, ATTACHMENT, None) is not None:
        raise ValueError(f"model: already has memory at {getattr(model.config, ATTACHMENT)['placement']!r}; "
                         "give every span in one add_memory call")
    entry = memory_entry(memory_config, placement)
    attach(model, entry, zero=zero)
    model_cls, config_cls = AUGMENTED[type(model)]
    model.config.__class__ = config_cls
    setattr(model.config, ATTACHMENT, entry)
    model.__class__ = model_cls
    return model


def freeze_except_memory(model, values_only: bool = False) -> int:
    """requires_grad=False on every parameter outside the memory layers (values_only: outside their
    value tables); returns the number of trainable parameters left."""
    keep = {id(p) for layer in memory_layers(model)
            for p in (layer.value_parameters() if values_only else layer.parameters())}
    if not keep:
        raise ValueError(f"model: {type(model).__name__} has no memory layers to train (use add_memory)")
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def memory_parameters(model) -> list[nn.Parameter]:
    return [p for layer in memory_layers(model) for p in layer.parameters()]


# ---------------------------------------------------------------- augmented classes

def _augmented_classes(base: type, family: str) -> tuple[type, type]:
    module = sys.modules[__name__]
    base_cfg = base.config_class
    cfg_cls = type(f"UltraMem{family}Config", (base_cfg,), {
        "model_type": f"ultramem_{base_cfg.model_type}", "__module__": __name__})

    def __init__(self, config):
        base.__init__(self, config)
        entry = getattr(config, ATTACHMENT, None)
        if entry is None:
            raise ValueError(f"config.{ATTACHMENT}: missing; an {type(self).__name__} needs the memory "
                             "entry that add_memory stores")
        attach(self, entry)  # the init is replaced by the loaded weights

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super(model_cls, cls).from_pretrained(*args, **kwargs)
        for layer in memory_layers(model):  # stage-1 Tucker vectors from the loaded cores
            layer.after_optimizer_step()
        return model

    model_cls = type(f"UltraMem{base.__name__}", (base,), {
        "config_class": cfg_cls, "__init__": __init__, "from_pretrained": from_pretrained,
        "_ultramem_base": base, "__module__": __name__})
    for cls in (cfg_cls, model_cls):  # module-level names, so the classes pickle by reference
        cls.__qualname__ = cls.__name__
        setattr(module, cls.__name__, cls)
    return model_cls, cfg_cls


AUGMENTED = {base: _augmented_classes(base, fam) for base, (fam, _, _) in FAMILIES.items()}


def register_augmented() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    for model_cls, cfg_cls in AUGMENTED.values():
        AutoConfig.register(cfg_cls.model_type, cfg_cls, exist_ok=True)
        AutoModelForCausalLM.register(cfg_cls, model_cls, exist_ok=True)
