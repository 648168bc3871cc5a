"""`UltraMemForCausalLM`: `ultramem.model.LanguageModel` as a Hugging Face `PreTrainedModel`.

The wrapped model's parameters keep their names under `model.` (model.tok_emb.weight, ...), so
safetensors files map one to one onto the library's own state dict. Generation uses the
library's `KVCache` (which also carries each memory layer's decode state, the query-conv
history) as the HF `cache`: `generate` then runs the same prefill + one-token steps as
`LanguageModel.generate`, so greedy outputs agree token for token.

Shape legend: B batch, T time, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel, TrainerCallback
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..attention import KVCache, rotary_tables
from ..memory import memory_layers
from ..model import IGNORE_INDEX, LanguageModel
from .configuration import UltraMemLMConfig


class UltraMemCache(KVCache):
    """The library's KV cache with the few attributes `generate` reads from an HF `Cache`."""

    is_compileable = False
    is_croppable = False

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.k)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.pos


class UltraMemPreTrainedModel(PreTrainedModel):
    config_class = UltraMemLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]

    @torch.no_grad()
    def _init_weights(self, module) -> None:
        """Weights are initialised by LanguageModel itself (its GPT-style init and each memory
        layer's own); HF's generic init would overwrite them, so only the rotary tables (buffers
        that from_pretrained leaves empty, as they are not saved) are computed here."""
        if isinstance(module, LanguageModel):
            c = module.cfg
            cos, sin = rotary_tables(c.dim // c.n_heads, c.max_seq_len, c.rope_theta)
            module.rope_cos.copy_(cos)
            module.rope_sin.copy_(sin)


class UltraMemForCausalLM(UltraMemPreTrainedModel, GenerationMixin):
    def __init__(self, config: UltraMemLMConfig, language_model: LanguageModel | None = None):
        """language_model: an existing model to wrap (its config must equal config's), e.g. one
        loaded from a training checkpoint; default: a freshly initialised one."""
        super().__init__(config)
        if language_model is not None and language_model.cfg.to_dict() != config.lm_config:
            raise ValueError("language_model: its LMConfig differs from config.lm_config")
        self.model = language_model if language_model is not None else _build_language_model(config.lm())
        # UltraMemV2's layers share one value pool: declare the aliases (target -> source) so
        # save_pretrained writes the pool once and from_pretrained ties it back.
        self._tied_weights_keys = _shared_parameters(self)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward builds its own UltraMemCache on the first call of `generate`

    def get_input_embeddings(self):
        return self.model.tok_emb

    def set_input_embeddings(self, value) -> None:
        self.model.tok_emb = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: UltraMemCache | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0, return_dict: bool | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        """HF causal-LM forward. labels are the input ids (shifted inside, -100 ignored); in
        training mode the model's auxiliary losses (MoE balance, memory core loss) are added."""
        if input_ids is None:
            raise ValueError("input_ids: required (inputs_embeds is not supported)")
        _check_mask(attention_mask)
        if use_cache and cache is None:
            cache = UltraMemCache(self.config.num_hidden_layers, input_ids.shape[0],
                                  self.config.max_position_embeddings)
        logits_BTV, _ = self.model(input_ids, kv_cache=cache)
        if logits_to_keep:
            logits_BTV = logits_BTV[:, -logits_to_keep:]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits_BTV[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                   ignore_index=IGNORE_INDEX)
            if self.training:
                loss = loss + self.model.aux_loss()
        return CausalLMOutputWithPast(loss=loss, logits=logits_BTV, cache=cache if use_cache else None)

    def after_optimizer_step(self) -> None:
        self.model.after_optimizer_step()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        # Loading writes the Tucker cores in place: re-derive the stage-1 vectors from them (what
        # the library's own checkpoint loader does), which also re-arms the staleness check.
        model.after_optimizer_step()
        return model


def _build_language_model(cfg) -> LanguageModel:
    # from_pretrained builds the model under torch.device("meta"). UltraMem's init computes on its
    # tensors (the Tucker SVD, the query-gain estimate), which meta tensors cannot do, so an
    # ultramem model is built on the CPU there (the loaded weights then replace the init; the cost
    # is one extra allocation at load). Every other kind inits shape-only and stays on meta.
    if cfg.ffn in ("ultramem", "ultramem_v2") and torch.empty(0).device.type == "meta":
        with torch.device("cpu"):
            return LanguageModel(cfg)
    return LanguageModel(cfg)


def _shared_parameters(module: torch.nn.Module) -> dict[str, str]:
    """{name: first name} for every parameter that is the same tensor as an earlier one."""
    first, out = {}, {}
    for name, p in module.named_parameters(remove_duplicate=False):
        out.update({name: first[id(p)]} if id(p) in first else {})
        first.setdefault(id(p), name)
    return out


def _check_mask(attention_mask: torch.Tensor | None) -> None:
    # The library's attention is causal without padding; a padded batch would silently attend to pads.
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("attention_mask: padding is not supported by UltraMemForCausalLM "
                         "(give equal-length prompts; got a mask with zeros)")


class AfterOptimizerStepCallback(TrainerCallback):
    """Calls every memory layer's `after_optimizer_step` (UltraMem's Tucker refresh) after each
    optimiser step of a `transformers.Trainer`, as the library's own trainer does."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            for layer in memory_layers(model):
                layer.after_optimizer_step()
        return control
