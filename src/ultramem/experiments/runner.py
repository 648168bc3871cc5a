"""Run a suite of experiment configs: skip finished runs, resume interrupted ones, optionally in the
background with a log, several runs at once (one process each, one thread each by default).

Layout under the experiments root (default `experiments/`):
    configs/<suite>/<run>.json            what to run (written by `ultramem exp configs`)
    runs/<suite>/<run>/                    checkpoints and logs (not committed)
    results/<suite>/<run>.json             summary of a finished run (committed)
    results/<suite>/<run>.metrics.jsonl    its metrics log, for curves (committed; small)
    logs/<suite>.log                       the background runner's log
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..checkpoint import atomic_write_text


def _paths(root: Path, suite: str, name: str) -> tuple[Path, Path]:
    return root / "runs" / suite / name, root / "results" / suite / f"{name}.json"


def list_configs(root: Path, suite: str) -> list[Path]:
    folder = root / "configs" / suite
    if not folder.is_dir():
        raise ValueError(f"suite: no configs at {folder}; run `ultramem exp configs {suite}` first")
    return sorted(folder.glob("*.json"))


def status(root: Path, suite: str) -> dict[str, list[str]]:
    """Runs by state: done (result written), started (checkpoint exists), pending."""
    out = {"done": [], "started": [], "pending": []}
    for cfg_path in list_configs(root, suite):
        run_dir, result = _paths(root, suite, cfg_path.stem)
        if result.exists():
            out["done"].append(cfg_path.stem)
        elif (run_dir / "checkpoint.safetensors").exists():
            out["started"].append(cfg_path.stem)
        else:
            out["pending"].append(cfg_path.stem)
    return out


def run_one(root: Path, suite: str, cfg_path: Path) -> dict:
    """Train (or resume) one run and write its result summary atomically."""
    from ..train import RunConfig, train

    spec = json.loads(cfg_path.read_text())
    run_dir, result_path = _paths(root, suite, cfg_path.stem)
    train_cfg = {**spec["train"], "out_dir": str(run_dir), "resume": True,
                 "cache_dir": str(root / "cache")}
    cfg = RunConfig.from_dict({"model": spec["model"], "data": spec["data"], "train": train_cfg})
    t0 = time.time()
    summary = train(cfg, log=lambda msg: print(f"[{cfg_path.stem}] {msg}", flush=True))
    summary.pop("losses", None)
    result = {"name": spec["name"], "group": spec.get("group", spec["name"]), "seed": spec.get("seed"),
              "suite": suite, "config": str(cfg_path), "wall_seconds_last_session": time.time() - t0,
              "tokens": summary["step"] * cfg.train.batch_size * cfg.train.seq_len, **summary}
    result_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "metrics.jsonl", result_path.with_suffix(".metrics.jsonl"))
    atomic_write_text(result_path, json.dumps(result, indent=1) + "\n")
    return result


def run_suite(root: Path, suite: str, jobs: int = 1, only: list[str] | None = None) -> int:
    """Run every unfinished config of the suite, `jobs` at a time, each in its own process."""
    todo = [p for p in list_configs(root, suite) if not _paths(root, suite, p.stem)[1].exists()]
    if only:
        todo = [p for p in todo if any(key in p.stem for key in only)]
    # Seed 0 of every variant first, so a suite cut short still has one complete comparison.
    todo.sort(key=lambda p: (p.stem.startswith("facts-"), p.stem.rsplit("-s", 1)[-1], p.stem))
    print(f"suite {suite}: {len(todo)} run(s) to do, {jobs} at a time", flush=True)
    running: list[tuple[subprocess.Popen, Path]] = []
    failures = 0
    while todo or running:
        while todo and len(running) < jobs:
            cfg_path = todo.pop(0)
            cmd = [sys.executable, "-m", "ultramem.experiments.runner", str(root), suite, str(cfg_path)]
            running.append((subprocess.Popen(cmd), cfg_path))
            print(f"started {cfg_path.stem}", flush=True)
        time.sleep(2)
        for proc, cfg_path in list(running):
            if proc.poll() is not None:
                running.remove((proc, cfg_path))
                ok = proc.returncode == 0
                failures += not ok
                state = "finished" if ok else f"FAILED (exit {proc.returncode})"
                print(f"{state} {cfg_path.stem}", flush=True)
    return 1 if failures else 0


def start_background(root: Path, suite: str, jobs: int, only: list[str] | None) -> Path:
    """Detach a runner for the suite; returns the log path."""
    log = root / "logs" / f"{suite}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "ultramem.cli", "exp", "run", suite, "--root", str(root),
           "--jobs", str(jobs)] + (["--only", *only] if only else [])
    with open(log, "a") as fh:
        subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return log


if __name__ == "__main__":  # one run in a child process: python -m ultramem.experiments.runner ROOT SUITE CFG
    run_one(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
