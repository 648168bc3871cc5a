"""Learning vs forgetting of `ultramem finetune` runs: one point per (method, learning rate).

    python scripts/finetune_tradeoff.py OUT.png DIR [DIR ...]   # DIRs hold results.json

Prints a markdown table (one row per run) and saves a scatter plot: x = rise of the original
data's val loss (forgetting), y = recall of the new facts in the trained phrasing (learning).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LR_KEY = {"memory": "lr_memory", "memory_values": "lr_memory", "memory_sparse": "lr_memory",
          "full": "lr_full", "lora": "lr_lora"}


def label(method: str, config: dict) -> str:
    return f"memory_sparse ({config.get('sparse_rows')} rows)" if method == "memory_sparse" else method


def load(dirs: list[str]) -> list[dict]:
    rows = []
    for d in dirs:
        res = json.loads((Path(d) / "results.json").read_text())
        before = res["rows"][0]
        for r in res["rows"][1:]:
            rows.append({**r, "lr": res["config"][LR_KEY[r["method"]]],
                         "label": label(r["method"], res["config"]),
                         "d_val": r["orig_val_loss"] - before["orig_val_loss"],
                         "d_facts": r["orig_fact_acc"] - before["orig_fact_acc"], "before": before})
    return sorted(rows, key=lambda r: (list(LR_KEY).index(r["method"]), r["label"], r["lr"]))


def table(rows: list[dict]) -> str:
    out = ["| method | lr | trainable params | new facts (seen) | new facts (held-out) | orig val loss Δ | "
           "orig facts Δ |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['label']} | {r['lr']:g} | {r['trainable']:,} | {r['new_fact_acc_seen']:.3f} | "
                   f"{r['new_fact_acc_heldout']:.3f} | {r['d_val']:+.3f} | {r['d_facts']:+.3f} |")
    return "\n".join(out)


def plot(rows: list[dict], out: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["label"] for r in rows):
        pts = sorted((r for r in rows if r["label"] == name), key=lambda r: r["lr"])
        ax.plot([r["d_val"] for r in pts], [r["new_fact_acc_seen"] for r in pts], "o-", label=name)
        for r in pts:
            ax.annotate(f"{r['lr']:g}", (r["d_val"], r["new_fact_acc_seen"]), fontsize=7)
    ax.set_xlabel("forgetting: rise of original val loss")
    ax.set_ylabel("learning: new-fact recall (trained phrasing)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    rows = load(sys.argv[2:])
    print(table(rows))
    plot(rows, sys.argv[1])
