"""`ultramem export-hf`: argument setup here (no transformers import, so
`ultramem --help` stays fast and works without the hf extra); the work is in `ultramem.hf`."""

from __future__ import annotations


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
