"""Out-of-domain evaluation of a suite's finished runs (issue 19, item 4).

`ultramem exp ood SUITE --data PATH [--tag NAME]` scores every finished text run whose checkpoint
is still under runs/<suite>/ on the given text and, with the same function and token cap, on the
run's own val text, so the two numbers differ only in the text. Results go to
results/<suite>/ood/<tag>/<run>.json (a subfolder: the suite's result loader never reads them);
the suite's report adds a table when any exist.

Runs of one suite share a tokenizer (same data section), so nats per token compare within a suite;
bits per byte compare across vocabularies too.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint import atomic_write_text
from .analysis import separated

DEFAULT_TOKENS = 262_144


def ood_dir(root: Path, suite: str, tag: str) -> Path:
    return Path(root) / "results" / suite / "ood" / tag


def evaluate_run(run_dir: Path, data: str, max_tokens: int = DEFAULT_TOKENS) -> dict:
    """{"ood": text_loss on `data`, "val": text_loss on the run's val text, step}: same cap."""
    from ..data.sources import read_text_documents
    from ..train import load_run, text_loss_of_run

    model, run_cfg, tok, ckpt = load_run(str(run_dir), "cpu")
    if tok is None:
        raise ValueError(f"{run_dir}: no tokenizer.json next to the checkpoint")
    val_path = (run_cfg.get("data") or {}).get("val_path")
    if not val_path:
        raise ValueError(f"{run_dir}: its data section has no val_path (not a text run)")
    ood_docs, val_docs = read_text_documents(data, "--data"), read_text_documents(val_path, "val_path")
    return {"step": ckpt.step, "data": data, "max_tokens": max_tokens,
            "ood": text_loss_of_run(model, tok, run_cfg, ood_docs, max_tokens),
            "val": text_loss_of_run(model, tok, run_cfg, val_docs, max_tokens)}


def finished_runs(root: Path, suite: str) -> list[dict]:
    """The results of the suite's configs that finished from their current config."""
    from .runner import list_configs, result_is_stale

    out = []
    for cfg in list_configs(Path(root), suite):
        path = Path(root) / "results" / suite / cfg.name
        if path.exists() and not result_is_stale(path, cfg):
            out.append(json.loads(path.read_text()))
    return out


def _scored(path: Path, step: int, data: str, max_tokens: int) -> bool:
    """A record of the same checkpoint step, text and cap is already there (rerunning is a no-op)."""
    if not path.exists():
        return False
    rec = json.loads(path.read_text())
    return (rec.get("step"), rec.get("data"), rec.get("max_tokens")) == (step, data, max_tokens)


def evaluate_suite(root: Path, suite: str, data: str, tag: str, max_tokens: int = DEFAULT_TOKENS,
                   log=print) -> list[Path]:
    """Score every finished text run of the suite that still has its checkpoint; skip the rest."""
    written = []
    for r in finished_runs(root, suite):
        run_dir = Path(root) / "runs" / suite / r["name"]
        if r["spec"]["data"].get("source") != "text":
            continue
        if not (run_dir / "checkpoint.safetensors").exists():
            log(f"skip {r['name']}: no checkpoint under {run_dir}")
            continue
        if r["step"] != r["spec"]["train"]["steps"]:
            log(f"skip {r['name']}: finished at step {r['step']}, not its last")
            continue
        path = ood_dir(root, suite, tag) / f"{r['name']}.json"
        if _scored(path, r["step"], data, max_tokens):
            log(f"{r['name']}: already scored ({path})")
            continue
        res = {"name": r["name"], "group": r["group"], "seed": r.get("seed"),
               **evaluate_run(run_dir, data, max_tokens)}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(res, indent=1) + "\n")
        log(f"{r['name']}: {tag} {res['ood']['bits_per_byte']:.4f} bits/byte, "
            f"val {res['val']['bits_per_byte']:.4f}")
        written.append(path)
    return written


def load_ood(root: Path, suite: str) -> dict[str, dict[str, list[dict]]]:
    """{tag: {group: [records]}} of every OOD result of the suite."""
    out: dict[str, dict[str, list[dict]]] = {}
    base = Path(root) / "results" / suite / "ood"
    for path in sorted(base.glob("*/*.json")) if base.is_dir() else []:
        rec = json.loads(path.read_text())
        out.setdefault(path.parent.name, {}).setdefault(rec["group"], []).append(rec)
    return out


def _cell(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{mean:.4f}" + (f" ± {(max(values) - min(values)) / 2:.4f}" if len(values) > 1 else "")


def ood_table(groups: dict[str, list[dict]], tag: str) -> str:
    """Bits per byte in-domain (val) and out-of-domain, each kind against dense (Δ, beyond noise?)."""
    rows = [f"| model | seeds | val bits/byte | {tag} bits/byte | Δ {tag} vs dense | beyond seed noise? "
            f"| {tag} - val |", "|---|---|---|---|---|---|---|"]
    dense = [r["ood"]["bits_per_byte"] for r in groups.get("dense", [])]
    for group in sorted(groups, key=lambda g: (g != "dense", g)):
        rs = groups[group]
        val = [r["val"]["bits_per_byte"] for r in rs]
        ood = [r["ood"]["bits_per_byte"] for r in rs]
        gap = [r["ood"]["bits_per_byte"] - r["val"]["bits_per_byte"] for r in rs]
        vs_dense = group != "dense" and dense
        delta = f"{sum(ood) / len(ood) - sum(dense) / len(dense):+.4f}" if vs_dense else "-"
        noise = separated(ood, dense) if vs_dense else "-"
        rows.append(f"| {group} | {len(rs)} | {_cell(val)} | {_cell(ood)} | {delta} | {noise} "
                    f"| {_cell(gap)} |")
    return "\n".join(rows)


def ood_sections(root: Path, suite: str) -> list[str]:
    """The report's out-of-domain tables (none when nothing was scored)."""
    parts = []
    for tag, groups in load_ood(root, suite).items():
        any_rec = next(iter(groups.values()))[0]
        parts += [f"Out-of-domain text `{tag}` ({any_rec['data']}; the first {any_rec['max_tokens']:,} "
                  "tokens of it and of the val text, each run's final checkpoint; mean ± half the seed "
                  "range):", "", ood_table(groups, tag), ""]
    return parts
