"""Hugging Face transformers integration (optional: `pip install ultramem[hf]`).

Importing this package registers model_type "ultramem" with `AutoConfig` and
`AutoModelForCausalLM`. The library's core never imports it.

- `UltraMemLMConfig`, `UltraMemForCausalLM`: our `LanguageModel` (any ffn kind) as a
  `PreTrainedModel` (save_pretrained / from_pretrained / generate / Trainer);
- `add_memory(model, memory_config, placement)`, `freeze_except_memory(model)`: memory layers
  added to an existing Llama / Mistral / Qwen2 / Qwen3 / GPT-2 model (logits unchanged at init);
- `export_run(run, out)`: a training run's checkpoint + BPE tokenizer -> an HF model directory.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .augment import add_memory, freeze_except_memory, memory_parameters, register_augmented
from .configuration import UltraMemLMConfig
from .modeling import AfterOptimizerStepCallback, UltraMemCache, UltraMemForCausalLM

AutoConfig.register(UltraMemLMConfig.model_type, UltraMemLMConfig, exist_ok=True)
AutoModelForCausalLM.register(UltraMemLMConfig, UltraMemForCausalLM, exist_ok=True)
register_augmented()

__all__ = ["AfterOptimizerStepCallback", "UltraMemCache", "UltraMemForCausalLM", "UltraMemLMConfig",
           "add_memory", "freeze_except_memory", "memory_parameters"]
