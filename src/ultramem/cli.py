"""The `ultramem` command line: train, eval, generate, plot, compare, bench.

Run configs are {model, data, train} tables (see ultramem.train.RunConfig), built in this order:
--preset NAME, then --config FILE (JSON, or TOML on Python 3.11+), then each --set a.b=value
(value parsed as JSON when it parses, else taken as a string: --set train.lr=1e-3,
--set model.memory_placement=0:1/2:3, --set data.fact_attributes='["field","employer"]').

Subcommands live in COMMANDS (name -> help, argument setup, handler); `bench` runs any module
ultramem.bench.<name>_bench (or <name>) that has a main(argv).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import statistics
import sys
import time
from pathlib import Path

from . import hf_commands  # --- hf (issue 20)
from .confbase import read_config_file
from .distributed import ckpt_cli  # --- dist (issue 16)
from .experiments import cli as exp_cli

SECTIONS = ("model", "data", "train")


# ---------------------------------------------------------------- config assembly

def load_config_file(path) -> dict:
    return read_config_file(path)


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_set(cfg: dict, assignment: str) -> None:
    """Apply one 'section.key[.subkey]=value' override in place."""
    key, sep, raw = assignment.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ValueError(f"--set {assignment!r}: expected section.key=value with section one of "
                         f"{list(SECTIONS)}")
    if parts[0] not in SECTIONS:
        raise ValueError(f"--set {assignment!r}: unknown section {parts[0]!r}; allowed are {list(SECTIONS)}")
    node = cfg
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {assignment!r}: '{p}' is not a table")
    node[parts[-1]] = parse_value(raw)


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


RUN_METADATA = ("name", "group", "seed")


def strip_run_metadata(d: dict, path) -> dict:
    """Drop the experiment runner's name/group/seed keys so its configs train as they are.

    `seed` is kept only as a check: the training seed is `train.seed`, and a file whose two seeds
    disagree is refused rather than silently trained with one of them.
    """
    if not any(k in d for k in RUN_METADATA):
        return d
    out = {k: v for k, v in d.items() if k not in RUN_METADATA}
    if "seed" in d:
        train = out.get("train")
        if not isinstance(train, dict):
            train = {}
        if "seed" in train and train["seed"] != d["seed"]:
            raise ValueError(f"--config: '{path}' has seed {d['seed']!r} but train.seed "
                             f"{train['seed']!r}; the run's seed is train.seed, make them agree")
        out["train"] = {**train, "seed": d["seed"]}
    return out


def assemble_config(preset: str | None = None, config: str | None = None, sets=()) -> dict:
    from .presets import get_preset

    d = get_preset(preset) if preset else {}
    if config:
        d = deep_merge(d, strip_run_metadata(load_config_file(config), config))
    for s in sets or ():
        apply_set(d, s)
    return d


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run config file (.json or .toml) with model/data/train tables")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override, e.g. --set train.steps=100 --set model.dim=64 (repeatable)")


# ---------------------------------------------------------------- train

def _train_args(p):
    from .presets import PRESETS

    p.add_argument("--preset", help=f"start from a preset: {', '.join(sorted(PRESETS))}")
    _config_args(p)
    p.add_argument("--out", help="run directory (train.out_dir)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run directory that holds a run (its run files are replaced)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def cmd_train(a) -> int:
    from .train import RunConfig, train

    d = assemble_config(a.preset, a.config, [s for s in a.set if not s.startswith("dist.")])
    dist_sets = [s for s in a.set if s.startswith("dist.")]
    tr = d.setdefault("train", {})
    if a.out:
        tr["out_dir"] = a.out
    if a.resume:
        tr["resume"] = True
    if a.overwrite:
        tr["overwrite"] = True
    if a.no_progress:
        tr["progress"] = False
    if dist_sets or "dist" in d or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _train_distributed(d, dist_sets, a)
    res = train(RunConfig.from_dict(d))
    print(json.dumps({k: v for k, v in res.items() if k not in ("losses", "params")}, indent=1))
    return 130 if res.get("interrupted") else 0


def _train_distributed(d: dict, dist_sets: list[str], a) -> int:
    """torchrun / `--set dist.*`: the sharded trainer (ultramem.distributed.trainer)."""
    from .distributed.trainer import DistConfig, train_distributed
    from .train import RunConfig

    dd = {"dist": dict(d.pop("dist", {}))}
    for s in dist_sets:
        key, _, raw = s.partition("=")
        dd["dist"][key.split(".", 1)[1]] = parse_value(raw)
    res = train_distributed(RunConfig.from_dict(d), DistConfig.from_dict(dd["dist"]))
    if res.get("world") is None or int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in res.items() if k not in ("losses", "params")}, indent=1))
    return 0


# ---------------------------------------------------------------- eval / generate

def _eval_args(p):
    p.add_argument("run", help="run directory or checkpoint file")
    p.add_argument("--fact-queries", type=int, help="fact-recall queries to ask (default: the run's)")
    p.add_argument("--windows", type=int, help="val windows (default: the run's)")
    p.add_argument("--cache-dir", help="data cache (default: the run's train.cache_dir)")
    p.add_argument("--data", help="evaluate on this text instead (a .txt file, folder or glob) with the "
                                  "run's tokenizer: loss and bits per byte")
    p.add_argument("--max-tokens", type=int, default=None, help="--data: score at most this many tokens")
    p.add_argument("--device", default="cpu")


def cmd_eval(a) -> int:
    if a.data:
        return _eval_text(a)
    from .data import DataConfig, prepare_data
    from .train import TrainConfig, autocast_for, evaluate, load_run

    model, run_cfg, _, ckpt = load_run(a.run, a.device)
    if not run_cfg.get("data") or not run_cfg.get("train"):
        raise ValueError(f"{ckpt.path}: checkpoint has no run config; cannot rebuild its data")
    tr = dict(run_cfg["train"])
    tr.update({k: v for k, v in (("fact_queries", a.fact_queries), ("eval_windows", a.windows),
                                 ("cache_dir", a.cache_dir), ("device", a.device)) if v is not None})
    tc = TrainConfig.from_dict(tr)
    data = prepare_data(DataConfig.from_dict(run_cfg["data"]), tc.cache_dir,
                        log=lambda m: print(m, file=sys.stderr))
    res = evaluate(model, data, tc, autocast_for(tc.dtype, next(model.parameters()).device))
    print(json.dumps({"checkpoint": str(ckpt.path), "step": ckpt.step, **res}, indent=1))
    return 0


def _eval_text(a) -> int:
    """`ultramem eval RUN --data PATH`: any text, the run's own tokenizer, loss and bits per byte."""
    from .data.sources import read_text_documents
    from .train import load_run, text_loss_of_run

    model, run_cfg, tok, ckpt = load_run(a.run, a.device)
    if tok is None:
        raise ValueError(f"{ckpt.path.parent}: no tokenizer.json next to the checkpoint")
    if a.max_tokens is not None and a.max_tokens < 1:
        raise ValueError(f"--max-tokens: must be a positive int (got {a.max_tokens})")
    res = text_loss_of_run(model, tok, run_cfg, read_text_documents(a.data, "--data"), a.max_tokens)
    print(json.dumps({"checkpoint": str(ckpt.path), "step": ckpt.step, "data": a.data, **res}, indent=1))
    return 0


def _generate_args(p):
    p.add_argument("run", help="run directory or checkpoint file")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")


def cmd_generate(a) -> int:
    import torch

    from .train import load_run

    model, _, tok, ckpt = load_run(a.run, a.device)
    if tok is None:
        raise ValueError(f"{ckpt.path.parent}: no tokenizer.json next to the checkpoint")
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"{ckpt.path.parent}/tokenizer.json has {tok.vocab_size} tokens but the "
                         f"checkpoint's model has vocab_size={model.cfg.vocab_size}: they are not one run's")
    ids = [tok.eos_id] + tok.encode(a.prompt)  # documents start with <|endoftext|> in training
    x = torch.tensor([ids], dtype=torch.long, device=a.device)
    gen = torch.Generator(device=a.device).manual_seed(a.seed)
    out = model.generate(x, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, eos_id=tok.eos_id,
                         generator=gen)
    print(a.prompt + tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True))
    return 0


# ---------------------------------------------------------------- plot

def _plot_args(p):
    from .plot import PANELS

    p.add_argument("runs", nargs="+", help="run directories (or metrics.jsonl files)")
    p.add_argument("--out", help="PNG path (default: <first run>/loss.png)")
    p.add_argument("--metrics", default="loss,val_loss", help=f"comma list of {', '.join(PANELS)}")


def cmd_plot(a) -> int:
    from .plot import plot_runs

    first = Path(a.runs[0])
    out = a.out or (first if first.is_dir() else first.parent) / "loss.png"
    print(f"plot saved to {plot_runs(a.runs, out, metrics=a.metrics.split(','))}")
    return 0


# ---------------------------------------------------------------- compare (the main job)

def _compare_args(p):
    from .presets import COMPARE_KINDS, COMPARE_PEOPLE, MODELS

    p.add_argument("--out", default="runs/compare",
                   help="directory for the runs, table and plot (a rerun replaces the runs there)")
    p.add_argument("--kinds", default=",".join(COMPARE_KINDS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--seeds", type=int, default=1, help="seeds per kind (mean +- std when > 1)")
    p.add_argument("--steps", type=int, help="shortcut for --set train.steps=N")
    p.add_argument("--people", type=int, default=COMPARE_PEOPLE,
                   help=f"people in the fact corpus, 5 facts each (default {COMPARE_PEOPLE}: more than the "
                        "dense model stores in the budget; a --config or --set data.num_people wins)")
    _config_args(p)
    p.add_argument("--no-progress", action="store_true")


def _fmt(xs: list[float], spec: str) -> str:
    if not xs or any(x is None for x in xs):
        return "-"
    if len(xs) == 1:
        return format(xs[0], spec)
    return f"{format(statistics.mean(xs), spec)}±{format(statistics.stdev(xs), spec)}"


def compare_table(rows: list[dict]) -> str:
    head = ["model", "total params", "activated", "val loss", "fact acc (seen)", "fact acc (held-out)",
            "train tok/s", "time s"]
    body = [[r["kind"], f"{r['total']:,}", f"{r['activated']:,}", _fmt(r["val_loss"], ".3f"),
             _fmt(r["fact_acc_seen"], ".3f"), _fmt(r["fact_acc_heldout"], ".3f"),
             _fmt(r["tokens_per_s"], ",.0f"), _fmt(r["seconds"], ".0f")] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), rule] + [line(b) for b in body])


def cmd_compare(a) -> int:
    from .plot import plot_runs
    from .presets import MODELS, get_preset
    from .train import RunConfig, train

    kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in MODELS]
    if bad or not kinds:
        raise ValueError(f"--kinds: unknown {bad}; allowed are {sorted(MODELS)}")
    if a.seeds < 1:
        raise ValueError(f"--seeds: must be >= 1 (got {a.seeds})")
    if a.people < 1:
        raise ValueError(f"--people: must be >= 1 (got {a.people})")
    out = Path(a.out)
    extra = load_config_file(a.config) if a.config else {}
    rows, runs, t_all = [], [], time.perf_counter()
    for kind in kinds:
        row = {"kind": kind, "val_loss": [], "fact_acc_seen": [], "fact_acc_heldout": [], "tokens_per_s": [],
               "seconds": []}
        for seed in range(a.seeds):
            d = get_preset(kind)
            d["data"]["num_people"] = a.people
            d = deep_merge(d, extra)
            for s in a.set:
                apply_set(d, s)
            tr = d["train"]
            tr["out_dir"] = str(out / (kind if a.seeds == 1 else f"{kind}-s{seed}"))
            tr["seed"] = tr.get("seed", 0) + seed
            if not tr.get("resume"):  # compare's --out holds its own runs: a rerun replaces them
                tr.setdefault("overwrite", True)
            if a.steps:  # keep the preset's warm-up unless it would not fit
                tr["steps"] = a.steps
                tr["warmup_steps"] = min(tr.get("warmup_steps", 0), a.steps // 5)
            if a.no_progress:
                tr["progress"] = False
            print(f"== {kind} (seed {tr['seed']}) -> {tr['out_dir']}")
            t0 = time.perf_counter()
            res = train(RunConfig.from_dict(d))
            row["seconds"].append(time.perf_counter() - t0)
            for k in ("val_loss", "fact_acc_seen", "fact_acc_heldout", "tokens_per_s"):
                row[k].append(res.get(k))
            row["total"], row["activated"] = res["params"]["total"], res["params"]["activated"]
            runs.append(tr["out_dir"])
        rows.append(row)
    table = compare_table(rows)
    plot = plot_runs(runs, out / "loss.png", metrics=("loss", "val_loss", "fact_acc"))
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    (out / "table.md").write_text(table + "\n")
    print(f"\n{table}\n\nactivated = params used per token, embeddings excluded; total includes embeddings.")
    print(f"total time {time.perf_counter() - t_all:.0f}s; loss curves saved to {plot}; "
          f"table in {out / 'table.md'}")
    return 0


# ---------------------------------------------------------------- bench

def bench_targets() -> dict[str, str]:
    """Benchmark name -> module, for every ultramem.bench module that has a main(argv)."""
    from . import bench

    names = {}
    for m in pkgutil.iter_modules(bench.__path__):
        module = f"{bench.__name__}.{m.name}"
        if callable(getattr(importlib.import_module(module), "main", None)):
            names[m.name.removesuffix("_bench")] = module
    return names


def _bench_args(p):
    p.add_argument("target", help="benchmark name (ultramem/bench/<name>_bench.py)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark (see its --help)")


def cmd_bench(a) -> int:
    targets = bench_targets()
    if a.target not in targets:
        raise ValueError(f"bench: unknown target {a.target!r}; allowed are {sorted(targets)}")
    return importlib.import_module(targets[a.target]).main(a.args) or 0


COMMANDS = {
    "train": ("train a model (preset / config file / --set overrides)", _train_args, cmd_train),
    "eval": ("val loss and fact-recall accuracy of a checkpoint", _eval_args, cmd_eval),
    "generate": ("sample text from a checkpoint (KV cache)", _generate_args, cmd_generate),
    "plot": ("loss curves of runs to a PNG", _plot_args, cmd_plot),
    "compare": ("train matched tiny Dense / MoE / UltraMem models side by side", _compare_args, cmd_compare),
    "bench": ("run a benchmark from ultramem.bench", _bench_args, cmd_bench),
    "exp": ("experiment suites: write configs, run, report (see EXPERIMENTS.md)", exp_cli.add_args,
            exp_cli.handler),
    # --- hf (issue 20): Hugging Face export and memory-only fine-tuning (ultramem.hf)
    "export-hf": ("a run's checkpoint + tokenizer as a Hugging Face model directory",
                  hf_commands.export_args, hf_commands.cmd_export),
    "finetune": ("teach a trained model new facts: memory-only vs full vs LoRA fine-tuning",
                 hf_commands.finetune_args, hf_commands.cmd_finetune),
    # --- end hf
    # --- dist (issue 16): sharded checkpoints
    "ckpt": ("checkpoint tools: convert DCP (sharded) <-> safetensors", ckpt_cli.add_args, ckpt_cli.handler),
    # --- end dist
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ultramem", description="UltraMem memory-layer language models")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_args, handler) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as e:  # config / checkpoint problems: one clear line, no traceback
        print(f"ultramem {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that cannot be read or written: name it, no traceback
        where = f" '{e.filename}'" if getattr(e, "filename", None) else ""
        print(f"ultramem {args.command}: error:{where} {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # training handles Ctrl-C itself (checkpoint); elsewhere just stop
        print(f"ultramem {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
