"""Named run presets: tiny matched Dense / MoE / PKM / UltraMem models on the generated fact corpus.

Matched (SPEC section 6): equal activated params per token (embeddings excluded, as counted by
ultramem.counting) for all kinds, and equal total params for MoE, PKM and UltraMem; within 1%
(tests/test_cli.py checks it). The memory models keep a narrower dense SwiGLU in every block and
spend the rest of the activated budget on the memory's queries, keys and the rows they read.

    dense     SwiGLU 194 wide
    moe       8 experts of width 96, top-2 (2 x 96 ~ the dense width)
    pkm       one PKM layer 1:2, 84^2 values of width 64, 4 heads x top-8; SwiGLU 164
    ultramem  one UltraMem layer 1:2, 83^2 values of width 64 (E=4 virtual copies), 2 heads x
              top-32; SwiGLU 137; the authors' init (`init="authors"`): of the recipe differences,
              the one that raised fact recall beyond seed noise on the main job (EXPERIMENTS.md,
              "One difference at a time"); a softmax over each head's kept scores (`softmax=True`,
              not the paper's): PKM's, without which PKM stored far fewer facts, and with which
              UltraMem stored more (EXPERIMENTS.md, "Knowledge capacity")
    ultramem-v2  UltraMemV2 beside every block's FFN, one 85^2-row pool (D_v 48, D_p 16) read by
              all 4 layers (share_group 6 >= 4), 1 head x top-64, key_dim 16; SwiGLU 73. At this
              width the keys dominate: memory ~62% of (memory + FFN) FLOPs, not the paper's ~17%
"""

from __future__ import annotations

import copy

_BASE = {"dim": 64, "n_layers": 4, "n_heads": 4, "max_seq_len": 128}

MODELS = {
    "dense": {**_BASE, "ffn": "dense", "ffn_hidden": 194},
    "moe": {**_BASE, "ffn": "moe", "moe_experts": 8, "moe_topk": 2, "moe_hidden": 96},
    "pkm": {**_BASE, "ffn": "pkm", "ffn_hidden": 164, "memory_placement": "1:2",
            "memory": {"num_keys": 84, "key_dim": 32, "heads": 4, "topk": 8}},
    "ultramem": {**_BASE, "ffn": "ultramem", "ffn_hidden": 137, "memory_placement": "1:2",
                 "memory": {"num_keys": 83, "key_dim": 16, "value_dim": 64, "heads": 2, "topk": 32,
                            "init": "authors", "softmax": True}},
    "ultramem-v2": {**_BASE, "ffn": "ultramem_v2", "ffn_hidden": 73,
                    "memory": {"num_keys": 85, "key_dim": 16, "value_dim": 48, "pre_value_dim": 16,
                               "topk": 64}},
}

# The presets' corpus, 100 people x 5 facts: the dense model stores most of it in 600 steps x 2048
# tokens (~27 passes over the 45k-token corpus).
DATA = {"source": "facts", "num_people": 100, "vocab_size": 512, "fact_repetitions": 5}
# The main job (`ultramem compare`) asks what a memory is for, so its corpus is larger than the
# dense model stores in that budget: at 200 people dense recalls ~1/3 of the facts, at 300 it
# stores ~60 of 1,500 (experiments/results/capacity.md).
COMPARE_PEOPLE = 200

# fp32: bf16 autocast was 0.8-0.95x fp32 speed for these tiny matmuls on this CPU.
TRAIN = {"steps": 600, "batch_size": 32, "seq_len": 64, "lr": 3e-3, "warmup_steps": 30,
         "min_lr_ratio": 0.1, "weight_decay": 0.1, "grad_clip": 1.0, "eval_every": 200,
         "eval_windows": 64, "fact_queries": 300, "log_every": 10, "dtype": "auto"}

PRESETS = {f"tiny-{kind}": kind for kind in MODELS}
COMPARE_KINDS = ("dense", "moe", "pkm", "ultramem")


def get_preset(name: str) -> dict:
    """A fresh run-config dict {model, data, train} for a preset name (or bare kind)."""
    kind = PRESETS.get(name, name if name in MODELS else None)
    if kind is None:
        raise ValueError(f"preset: unknown name {name!r}; allowed are {sorted(PRESETS)}")
    return {"model": copy.deepcopy(MODELS[kind]), "data": dict(DATA),
            "train": {**TRAIN, "out_dir": f"runs/tiny-{kind}"}}
