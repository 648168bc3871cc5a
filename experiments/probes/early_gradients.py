"""Early-gradient probe: what separates the SPEC's init from 0.02 values early in training.

It was written to test a hypothesis about the early collapse: that every token first asks its
memory layer for nearly the same thing (the gradient of the loss with respect to the layer's
output shared across tokens), so that large random values pull every query to the same slots.
The gradient cosines below refute that premise (0.001-0.007); the other statistics are what does
differ (EXPERIMENTS.md, "collapse").

Measured here, for main's UltraMem under the SPEC's init, the SPEC's init with 0.02 values and the
authors' init, seeds 0 and 1, at steps 0, 1, 2, 4, 8, 13, 26, 52 of the full runs' schedule:
- grad_cos: mean pairwise cosine, over 4,096 val tokens, of d loss / d (memory output) a token;
- value_drift: |V_step - V_0| / |V_0| of each layer's value table (how much of it is learned);
- update_cos: mean pairwise cosine of the changed value rows' updates V_step - V_0 (1: every row
  moved the same way, i.e. learned the same content);
- out_rms: RMS of the memory layer's output on those tokens; init_share: RMS of the part of it
  that the initial values V_0 make, over out_rms (the output is linear in the value table, so
  out(V) = out(V_0) + out(V - V_0) with the same retrieval; 1: still all random init);
- rows_read: share of value rows the 4,096 val tokens read; top10_reads: share of those reads
  going to the most-read 10% of rows (0.1 is uniform).
The finished `main` runs with the same settings (step 1,300) get the same statistics, plus their
val loss with each value table's V_0 subtracted (what the random init content does to the model).
Training is the library's own `train` stopped and resumed at each step (bit-identical to an
uninterrupted run). Writes experiments/results/early_gradients.md, .json and _init_share.png;
~12 min on one core.

    python experiments/probes/early_gradients.py        (repository root, venv active)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from ultramem.data import prepare_data
from ultramem.diagnostics import mean_pairwise_cosine, memory_output_grads, row_reads
from ultramem.model import LanguageModel
from ultramem.train import RunConfig, evaluate, load_run, model_config_for, seed_everything, train

ROOT = Path("experiments")
OUT = ROOT / "runs" / "probes" / "early-gradients"
STEPS = (1, 2, 4, 8, 13, 26, 52)
PROBES = {  # name: (main config without seed, value_init_std override)
    "paper": ("ultramem", None),
    "paper-v0.02": ("ultramem", 0.02),
    "authors": ("ultramem-authors-init", None),
}
FINISHED = {  # name: the `main` run trained with the same settings to 1,300 steps (5.3M tokens)
    "paper": "ultramem", "paper-v0.02": "ultramem-paper-init-small-values",
    "authors": "ultramem-authors-init",
}
SEEDS = (0, 1)
PROBE_WINDOWS, SEQ = 32, 128


def run_config(cfg_name: str, seed: int, value_std: float | None, out_dir: Path) -> RunConfig:
    spec = json.loads((ROOT / "configs" / "main" / f"{cfg_name}-s{seed}.json").read_text())
    model = json.loads(json.dumps(spec["model"]))
    if value_std is not None:
        model["memory"]["value_init_std"] = value_std
    train_cfg = {**spec["train"], "out_dir": str(out_dir), "resume": "auto", "progress": False,
                 "cache_dir": str(ROOT / "cache"), "eval_every": 13, "threads": 1}
    return RunConfig.from_dict({"model": model, "data": spec["data"], "train": train_cfg})


def step0_model(mcfg, seed: int) -> LanguageModel:
    """The model at step 0, built exactly as `train` builds it (same seeding, same order)."""
    seed_everything(seed)
    return LanguageModel(mcfg)


def value_copies(model) -> list[torch.Tensor]:
    return [m.values.rows().detach().clone() for m in model.memory_layers()]


@contextlib.contextmanager
def values_set_to(tables: list[torch.Tensor], new: list[torch.Tensor]):
    """Temporarily overwrite value tables in place (the trained values come back on exit)."""
    saved = [w.detach().clone() for w in tables]
    try:
        with torch.no_grad():
            for w, v in zip(tables, new, strict=True):
                w.copy_(v.view_as(w))
        yield
    finally:
        with torch.no_grad():
            for w, keep in zip(tables, saved, strict=True):
                w.copy_(keep)


def reads(layer, x_BTD) -> tuple[float, float]:
    counts = row_reads(layer, x_BTD).sort(descending=True).values
    top = counts[: max(1, counts.numel() // 10)].sum() / counts.sum()
    return (counts > 0).float().mean().item(), top.item()


@torch.no_grad()
def init_part(layer, x_BTD, v0: torch.Tensor) -> tuple[float, float]:
    """(RMS of the layer's output, RMS of the part its initial values make / that RMS)."""
    w = layer.values.weight
    out = layer(x_BTD)
    with values_set_to([w], [v0]):
        from_init = layer(x_BTD)
    with values_set_to([w], [w - v0.view_as(w)]):
        learned = layer(x_BTD)
    # the decomposition only holds if the output is linear in the values: check, don't assume
    torch.testing.assert_close(from_init + learned, out, rtol=1e-4, atol=1e-5)
    rms = out.pow(2).mean().sqrt()
    return rms.item(), (from_init.pow(2).mean().sqrt() / rms).item()


def measure(model, init_values: list[torch.Tensor], x_BT, y_BT) -> dict:
    model.train()  # the training-time search and dropout settings (dropout is 0 in these runs)
    grads = memory_output_grads(model, x_BT, y_BT)
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda _m, a: inputs.append(a[0])) for m in model.memory_layers()]
    with torch.no_grad():
        model(x_BT)
    for h in hooks:
        h.remove()
    out = {}
    layers = model.memory_layers()
    for i, (layer, g, v0, x) in enumerate(zip(layers, grads, init_values, inputs, strict=True)):
        v = layer.values.rows().detach()
        dv = v - v0
        moved = dv[dv.norm(dim=-1) > 0]
        rows_read, top10 = reads(layer, x)
        out_rms, init_share = init_part(layer, x, v0)
        out[f"mem{i}"] = {
            "grad_cos": mean_pairwise_cosine(g),
            "value_drift": (dv.norm() / v0.norm()).item(),
            # > 0 only if v0 really is this table's init (~0 for an unrelated draw): checks the rebuild
            "init_corr": torch.corrcoef(torch.stack([v.flatten(), v0.flatten()]))[0, 1].item(),
            "update_cos": mean_pairwise_cosine(moved[:4096]) if moved.shape[0] >= 2 else None,
            "rows_moved": moved.shape[0] / v.shape[0],
            "out_rms": out_rms, "init_share": init_share,
            "rows_read": rows_read, "top10_reads": top10,
        }
    return out


def probe(name: str, seed: int, data, x_BT, y_BT) -> list[dict]:
    cfg_name, value_std = PROBES[name]
    out_dir = OUT / f"{name}-s{seed}"
    shutil.rmtree(out_dir, ignore_errors=True)  # a leftover checkpoint would be resumed past a step
    cfg = run_config(cfg_name, seed, value_std, out_dir)
    mcfg = model_config_for(cfg.model, data.vocab_size, cfg.train.seq_len)
    model0 = step0_model(mcfg, cfg.train.seed)
    init_values = value_copies(model0)
    rows = [{"step": 0, **measure(model0, init_values, x_BT, y_BT)}]
    for step in STEPS:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stop_after=step))
        train(cfg, log=lambda _m: None, data=data)
        model, *_ = load_run(out_dir)
        rows.append({"step": step, **measure(model, init_values, x_BT, y_BT)})
        print(f"{name}-s{seed} step {step}: " + "; ".join(
            f"mem{i} grad_cos {r['grad_cos']:.3f} drift {r['value_drift']:.2f} read {r['rows_read']:.2f}"
            for i, r in enumerate(rows[-1][k] for k in ("mem0", "mem1"))), flush=True)
    return rows


@torch.no_grad()
def loss_without_init(model, init_values: list[torch.Tensor], data, run_cfg: dict) -> dict:
    """Val loss of the run (its own eval windows) as trained, and with V_0 subtracted from every
    value table: what the random content still in the tables does to the trained model."""
    tc = dataclasses.replace(RunConfig.from_dict(run_cfg).train, memory_diagnostics=False)
    out = {"val_loss": evaluate(model, data, tc, contextlib.nullcontext())["val_loss"]}
    tables = [m.values.weight for m in model.memory_layers()]
    with values_set_to(tables, [w - v0.view_as(w) for w, v0 in zip(tables, init_values, strict=True)]):
        out["val_loss_without_init"] = evaluate(model, data, tc, contextlib.nullcontext())["val_loss"]
    return out


def finished(name: str, seed: int, data, x_BT, y_BT) -> dict | None:
    """The same statistics on the finished `main` run, if its final checkpoint is here."""
    run = ROOT / "runs" / "main" / f"{FINISHED[name]}-s{seed}"
    if not (ROOT / "results" / "main" / f"{run.name}.json").exists():
        return None  # not finished (a checkpoint alone may be mid-run)
    model, run_cfg, *_ = load_run(run)
    init_values = value_copies(step0_model(model.cfg, run_cfg["train"]["seed"]))
    out = {"step": 1300, **measure(model, init_values, x_BT, y_BT),
           **loss_without_init(model, init_values, data, run_cfg)}
    print(f"{run.name}: val loss {out['val_loss']:.4f}, without the init values "
          f"{out['val_loss_without_init']:.4f}", flush=True)
    print(f"{run.name} (finished): " + "; ".join(
        f"mem{i} init_corr {out[f'mem{i}']['init_corr']:.3f} init_share {out[f'mem{i}']['init_share']:.2f}"
        for i in (0, 1)), flush=True)
    return out


def table(results: dict) -> str:
    lines = ["| probe | step | grad_cos L0 / L1 | value drift L0 / L1 | update cos L0 / L1 | "
             "out RMS L0 / L1 | init share L0 / L1 | rows read L0 / L1 | top-10% reads L0 / L1 |",
             "|---|---|---|---|---|---|---|---|---|"]

    def pair(rows, key, fmt="{:.3f}"):
        vals = [[r[f"mem{i}"][key] for r in rows] for i in (0, 1)]
        mean = [None if None in v else sum(v) / len(v) for v in vals]
        return " / ".join("-" if m is None else fmt.format(m) for m in mean)

    for name in PROBES:
        by_seed = [results[f"{name}-s{s}"] for s in SEEDS if f"{name}-s{s}" in results]
        for k, step in enumerate([0, *STEPS, 1300]):
            rows = [r[k] for r in by_seed if len(r) > k]
            if len(rows) < len(by_seed):  # a finished run is missing: no mean over fewer seeds
                lines.append(f"| {name} | {step} | not finished for every seed |||||||")
                continue
            lines.append(f"| {name} | {step} | {pair(rows, 'grad_cos')} | "
                         f"{pair(rows, 'value_drift', '{:.2f}')} | {pair(rows, 'update_cos')} | "
                         f"{pair(rows, 'out_rms')} | {pair(rows, 'init_share', '{:.2f}')} | "
                         f"{pair(rows, 'rows_read', '{:.2f}')} | "
                         f"{pair(rows, 'top10_reads', '{:.2f}')} |")
    return "\n".join(lines) + "\n"


def finished_table(results: dict) -> str:
    lines = ["\nFinished runs: val loss (their eval windows) as trained and with each value table's "
             "init V_0 subtracted.\n", "| run | val loss | without V_0 | change |", "|---|---|---|---|"]
    for key, rows in results.items():
        end = rows[-1]
        if end["step"] == 1300:
            lines.append(f"| {FINISHED[key.rsplit('-s', 1)[0]]}-s{key.rsplit('-s', 1)[1]} | "
                         f"{end['val_loss']:.4f} | {end['val_loss_without_init']:.4f} | "
                         f"{end['val_loss_without_init'] - end['val_loss']:+.4f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Init share of each layer's output against training steps (symlog axis), seeds as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for layer, ax in enumerate(axes):
        for color, name in zip(("C3", "C0", "C2"), PROBES, strict=True):
            for seed in SEEDS:
                rows = results.get(f"{name}-s{seed}", [])
                ax.plot([r["step"] for r in rows], [r[f"mem{layer}"]["init_share"] for r in rows],
                        "o-", color=color, ms=3, lw=1, label=name if seed == SEEDS[0] else None)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("training step (1,300 = 5.3M tokens)")
        ax.set_title(f"memory layer {layer}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of output RMS from the init values")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    first = run_config("ultramem", 0, None, OUT / "unused")
    data = prepare_data(first.data, first.train.cache_dir, log=lambda _m: None)
    val = torch.from_numpy(data.val[: PROBE_WINDOWS * SEQ + 1].astype("int64"))
    x_BT, y_BT = val[:-1].view(PROBE_WINDOWS, SEQ), val[1:].view(PROBE_WINDOWS, SEQ)
    dest = ROOT / "results" / "early_gradients.json"
    results = json.loads(dest.read_text())["probes"] if dest.exists() else {}
    for name in PROBES:
        for seed in SEEDS:
            key = f"{name}-s{seed}"
            if key in results:
                print(f"skip {key} (done)")
                continue
            results[key] = probe(name, seed, data, x_BT, y_BT)
            dest.write_text(json.dumps({"steps": [0, *STEPS], "probes": results}, indent=1) + "\n")
    for key, rows in results.items():
        name, seed = key.rsplit("-s", 1)
        rows[:] = [r for r in rows if r["step"] <= STEPS[-1]]
        end = finished(name, int(seed), data, x_BT, y_BT)
        if end is not None:
            rows.append(end)
    dest.write_text(json.dumps({"steps": [0, *STEPS], "probes": results}, indent=1) + "\n")
    md = ("# Early-gradient probe (`python experiments/probes/early_gradients.py`)\n\n"
          "Mean of the seeds done; L0 / L1 = memory layer 0 / 1; step 1300 is the finished `main` run "
          "with the same settings (5.3M tokens). See the script's docstring.\n\n"
          + table(results) + finished_table(results))
    (ROOT / "results" / "early_gradients.md").write_text(md)
    plot(results, ROOT / "results" / "early_gradients_init_share.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
