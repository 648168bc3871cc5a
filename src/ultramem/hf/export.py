"""A training run (checkpoint + its BPE tokenizer.json) -> a Hugging Face model directory.

The tokenizer becomes a `PreTrainedTokenizerFast` whose post-processor prepends <|endoftext|>
to every text, as training documents and `ultramem generate` prompts begin with it: so
`tokenizer(prompt)` + `model.generate(...)` reproduces `ultramem generate` for the same prompt.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from ..data import Tokenizer
from ..runs import load_run
from .configuration import UltraMemLMConfig
from .modeling import UltraMemForCausalLM


def hf_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """The library's Tokenizer as a PreTrainedTokenizerFast (eos doubles as bos and pad)."""
    backend = _copy_backend(tok)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{tok.eos_token} $A", pair=f"{tok.eos_token} $A {tok.eos_token} $B",
        special_tokens=[(tok.eos_token, tok.eos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=tok.eos_token,
                                   bos_token=tok.eos_token, pad_token=tok.eos_token)


def _copy_backend(tok: Tokenizer):
    from tokenizers import Tokenizer as Backend

    return Backend.from_str(tok.to_str())  # a copy: the run's own tokenizer is left as it is


def export_run(run, out, max_shard_size: str | int = "2GB", device: str = "cpu") -> Path:
    """Write `out/` (config.json, model*.safetensors, tokenizer files) from a run dir or checkpoint."""
    model, _, tok, ckpt = load_run(run, device)
    if tok is None:
        raise ValueError(f"{ckpt.path.parent}: no tokenizer.json next to the checkpoint")
    cfg = UltraMemLMConfig(lm_config=model.cfg.to_dict(), eos_token_id=tok.eos_id, bos_token_id=tok.eos_id,
                           pad_token_id=tok.eos_id)
    hf = UltraMemForCausalLM(cfg, language_model=model)
    hf.generation_config.eos_token_id = tok.eos_id
    hf.generation_config.pad_token_id = tok.eos_id
    out = Path(out)
    hf.save_pretrained(out, max_shard_size=max_shard_size)
    hf_tokenizer(tok).save_pretrained(out)
    return out
