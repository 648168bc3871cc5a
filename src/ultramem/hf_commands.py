"""`ultramem export-hf` and `ultramem finetune`: argument setup here (no transformers import, so
`ultramem --help` stays fast and works without the hf extra); the work is in `ultramem.hf`."""

from __future__ import annotations

import json


def _import_hf():
    try:
        import ultramem.hf as hf
    except ImportError as e:
        raise ValueError(f"transformers is not installed ({e}); pip install 'ultramem[hf]'") from e
    return hf


def export_args(p) -> None:
    p.add_argument("run", help="run directory or checkpoint file (from `ultramem train`)")
    p.add_argument("out", help="output directory for the Hugging Face model + tokenizer")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors file, e.g. 500MB")
    p.add_argument("--device", default="cpu")


def cmd_export(a) -> int:
    from ultramem.hf.export import export_run

    _import_hf()
    print(f"saved to {export_run(a.run, a.out, max_shard_size=a.max_shard_size, device=a.device)}")
    return 0


def finetune_args(p) -> None:
    p.add_argument("run", help="a trained run directory (from `ultramem train` on the fact corpus)")
    p.add_argument("--out", default="runs/finetune", help="directory for results.json / table.md")
    p.add_argument("--methods", default="memory,full,lora", help="comma list of memory, full, lora")
    p.add_argument("--new-people", type=int, default=20, help="people in the fresh batch of facts")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--placement", default="", help="memory spans i:j (default: the middle block)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="FinetuneConfig override, e.g. --set lr_memory=1e-2 (repeatable)")


def cmd_finetune(a) -> int:
    _import_hf()
    from ultramem.hf.finetune import FinetuneConfig, run_finetune

    extra = {}
    for s in a.set:
        key, _, raw = s.partition("=")
        try:
            extra[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            extra[key.strip()] = raw
    cfg = FinetuneConfig(methods=tuple(m.strip() for m in a.methods.split(",") if m.strip()),
                         new_people=a.new_people, steps=a.steps, placement=a.placement, **extra)
    res = run_finetune(a.run, a.out, cfg)
    print(res["table"])
    return 0
