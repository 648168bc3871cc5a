"""`UltraMemLMConfig`: the Hugging Face config of an `ultramem.model.LanguageModel`.

The library's `LMConfig` is stored whole as a dict (`lm_config`), so a saved config.json rebuilds
exactly the model that was trained; the usual HF names (vocab_size, hidden_size, ...) are mirrored
from it for the tools that read them (generation, Trainer, peft).
"""

from __future__ import annotations

from transformers import PretrainedConfig

from ..model import LMConfig


class UltraMemLMConfig(PretrainedConfig):
    model_type = "ultramem"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(self, lm_config: dict | None = None, **kwargs):
        # Validate now (ValueError naming the field), and keep the fully resolved dict.
        lm = LMConfig.from_dict(dict(lm_config or {})) if not isinstance(lm_config, LMConfig) else lm_config
        self.lm_config = lm.to_dict()
        kwargs.setdefault("tie_word_embeddings", lm.tie_embeddings)
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            kwargs.pop(name, None)  # mirrors of lm_config, never independent settings
        super().__init__(**kwargs)
        self.vocab_size = lm.vocab_size
        self.hidden_size = lm.dim
        self.num_hidden_layers = lm.n_layers
        self.num_attention_heads = lm.n_heads
        self.max_position_embeddings = lm.max_seq_len

    def lm(self) -> LMConfig:
        return LMConfig.from_dict(self.lm_config)
