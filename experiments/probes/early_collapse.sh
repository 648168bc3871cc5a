#!/usr/bin/env bash
# Early-collapse probe: the first 104 steps (0.43M tokens) of main's UltraMem runs under each init
# and value-table scale, evaluated every 13 steps. Writes runs to experiments/runs/probes/early-collapse/,
# the table experiments/results/early_collapse.md and its data, early_collapse.json.
#
# Each probe keeps its run's whole schedule (1,300 steps, 60 warm-up) and stops early
# (train.stop_after), so its first 104 steps are exactly those of the full run with the same
# settings. ~3 min a probe on one core.
#
#   bash experiments/probes/early_collapse.sh      (from the repository root, venv active)
set -euo pipefail
export HF_HUB_OFFLINE=1
root=experiments
out=$root/runs/probes/early-collapse
mkdir -p "$out"

# name | main config (without seed) | seed | extra --set overrides
probes=(
  "paper-s0|ultramem|0|"
  "paper-s1|ultramem|1|"
  "authors-s0|ultramem-authors-init|0|"
  "authors-s1|ultramem-authors-init|1|"
  "calibrated-s0|ultramem-calibrated-init|0|"
  "calibrated-s1|ultramem-calibrated-init|1|"
  "calibrated-v0.02-s0|ultramem-calibrated-init|0|model.memory.value_init_std=0.02"
  "calibrated-v0.02-s1|ultramem-calibrated-init|1|model.memory.value_init_std=0.02"
  "paper-v0.02-s0|ultramem|0|model.memory.value_init_std=0.02"
  "paper-v0.02-s1|ultramem|1|model.memory.value_init_std=0.02"
  "authors-v0.125-s0|ultramem-authors-init|0|model.memory.value_init_std=0.125"
  "authors-v0.125-s1|ultramem-authors-init|1|model.memory.value_init_std=0.125"
  "calibrated-vlr1-s0|ultramem-calibrated-init|0|train.value_lr_mult=1.0"
)

for p in "${probes[@]}"; do
  IFS='|' read -r name cfg seed extra <<<"$p"
  if [[ -f $out/$name/done ]]; then echo "skip $name (done)"; continue; fi
  rm -rf "${out:?}/$name"
  mkdir -p "$out/$name"
  cp "$root/configs/main/$cfg-s$seed.json" "$out/$name/config.json"
  sets=(--set train.stop_after=104 --set train.eval_every=13 --set train.cache_dir=$root/cache)
  [[ -n $extra ]] && sets+=(--set "$extra")
  echo "probe $name: $cfg-s$seed ${extra:-(as configured)}"
  ultramem train --config "$out/$name/config.json" "${sets[@]}" --out "$out/$name/run" --no-progress \
    >"$out/$name/log.txt" 2>&1
  touch "$out/$name/done"
done

python - "$out" "$root/results/early_collapse.md" <<'EOF'
import json, sys
from pathlib import Path

out, dest = Path(sys.argv[1]), Path(sys.argv[2])
rows, lines = [], []
for d in sorted(p for p in out.iterdir() if (p / "done").exists()):
    evals = [r for r in map(json.loads, (d / "run" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "eval"]
    rows.append({"probe": d.name, "evals": [{k: r[k] for k in (
        "step", "val_loss", "mem0_rows_used", "mem1_rows_used", "mem0_top10pct_reads",
        "mem1_top10pct_reads")} for r in evals]})
steps = [e["step"] for e in rows[0]["evals"]]
lines += ["# Early collapse probe (main's UltraMem, first 104 steps)", "",
          "Share of layer 0's / layer 1's value rows read by 64 val windows (8k tokens) at each "
          "eval; val loss at the last. Made by `bash experiments/probes/early_collapse.sh`.", "",
          "| probe | " + " | ".join(f"step {s}" for s in steps) + " | val loss |",
          "|---|" + "---|" * (len(steps) + 1)]
for r in rows:
    cells = [f"{e['mem0_rows_used']:.2f} / {e['mem1_rows_used']:.2f}" for e in r["evals"]]
    lines.append(f"| {r['probe']} | " + " | ".join(cells) + f" | {r['evals'][-1]['val_loss']:.3f} |")
summary = json.dumps({"probe": "early_collapse", "rows": rows})
dest.write_text("\n".join(lines) + "\n")
dest.with_suffix(".json").write_text(summary + "\n")
print("\n".join(lines))
print(summary)
EOF
