"""Run a suite of experiment configs: skip finished runs, resume interrupted ones, optionally in the
background with a log, several runs at once (one process each, one thread each by default).

Layout under the experiments root (default `experiments/`):
    configs/<suite>/<run>.json            what to run (written by `ultramem exp configs`)
    runs/<suite>/<run>/                    checkpoints and logs (not committed)
    results/<suite>/<run>.json             summary of a finished run (committed)
    results/<suite>/<run>.metrics.jsonl    its metrics log, for curves (committed; small)
    logs/<suite>.log                       the background runner's log
    runs/<suite>/<run>/running.pid         held while a process trains the run (stale ones are taken over)
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


def result_is_stale(result_path: Path, cfg_path: Path) -> bool:
    """True when a finished run's recorded config differs from its config file now.

    Editing a config after its run finished must not leave the old numbers standing in for the new
    config. Results written before configs were recorded in them carry none and count as current."""
    spec = json.loads(result_path.read_text()).get("spec")
    return spec is not None and spec != json.loads(cfg_path.read_text())


def _stale_message(suite: str, name: str) -> str:
    return (f"STALE {suite}/{name}: its result was made from a different config than "
            f"configs/{suite}/{name}.json holds now; not rerun. Move results/{suite}/{name}.* and "
            f"runs/{suite}/{name}/ aside (or restore the config) to go on.")


def status(root: Path, suite: str) -> dict[str, list[str]]:
    """Runs by state: done (result written from the current config), stale (result written from a
    different config), running (a live process holds its lock), started (checkpoint exists, nobody
    training it), pending."""
    out = {"done": [], "stale": [], "running": [], "started": [], "pending": []}
    for cfg_path in list_configs(root, suite):
        run_dir, result = _paths(root, suite, cfg_path.stem)
        if result.exists():
            out["stale" if result_is_stale(result, cfg_path) else "done"].append(cfg_path.stem)
        elif running_pid(run_dir) is not None:
            out["running"].append(cfg_path.stem)
        elif (run_dir / "checkpoint.safetensors").exists():
            out["started"].append(cfg_path.stem)
        else:
            out["pending"].append(cfg_path.stem)
    return out


def progress(root: Path, suite: str, name: str) -> tuple[int, int] | None:
    """(last logged training step, configured steps) of an unfinished run; None before its first log."""
    run_dir = _paths(root, suite, name)[0]
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return None
    step = None
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        if rec.get("kind") == "train":
            step = rec["step"]
    if step is None:
        return None
    total = json.loads((root / "configs" / suite / f"{name}.json").read_text())["train"]["steps"]
    return step, total


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_pid(run_dir: Path) -> int | None:
    """PID of the live process training this run, or None (no lock, or its owner is gone)."""
    try:
        pid = int((run_dir / "running.pid").read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return None
    return pid if pid > 0 and _pid_alive(pid) else None


def _acquire(run_dir: Path) -> Path:
    """Take the run's lock, so two runners never train (and checkpoint) the same run at once."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / "running.pid"
    owner = running_pid(run_dir)
    if owner is not None and owner != os.getpid():
        raise RuntimeError(f"{run_dir}: already being trained by process {owner}")
    lock.unlink(missing_ok=True)  # stale: its owner died
    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # lost a race -> FileExistsError
    with os.fdopen(fd, "w") as fh:
        fh.write(str(os.getpid()))
    return lock


def run_one(root: Path, suite: str, cfg_path: Path) -> dict:
    """Train (or resume) one run and write its result summary atomically."""
    spec = json.loads(cfg_path.read_text())
    run_dir, result_path = _paths(root, suite, cfg_path.stem)
    lock = _acquire(run_dir)
    try:
        return _train_and_summarise(root, suite, cfg_path, spec, run_dir, result_path)
    finally:
        lock.unlink(missing_ok=True)


def code_version() -> str:
    """`git describe --always --dirty` of the checkout this package runs from ("unknown" outside
    git): a config records what ran, this records which code ran it."""
    here = Path(__file__).parent

    def git(*args):
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=20)

    try:
        # An installed copy (site-packages) may sit inside some other repository: only a checkout
        # that tracks this very file describes the code.
        if git("ls-files", "--error-unmatch", Path(__file__).name).returncode != 0:
            return "unknown"
        out = git("describe", "--always", "--dirty", "--abbrev=12")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _note_code_version(run_dir: Path) -> list[str]:
    """Append this session's code version to the run's list (a resumed run may span several)."""
    path = run_dir / "code_versions.txt"
    seen = path.read_text().split() if path.exists() else []
    version = code_version()
    if not seen or seen[-1] != version:
        seen.append(version)
        atomic_write_text(path, "\n".join(seen) + "\n")
    return seen


def _train_and_summarise(root, suite, cfg_path, spec, run_dir, result_path) -> dict:
    from ..train import RunConfig, train

    versions = _note_code_version(run_dir)
    train_cfg = {**spec["train"], "out_dir": str(run_dir), "resume": "auto",
                 "cache_dir": str(root / "cache")}
    cfg = RunConfig.from_dict({"model": spec["model"], "data": spec["data"], "train": train_cfg})
    t0 = time.time()
    summary = train(cfg, log=lambda msg: print(f"[{cfg_path.stem}] {msg}", flush=True))
    summary.pop("losses", None)
    if summary.get("interrupted"):  # stopped by a signal after a checkpoint: not a result
        print(f"[{cfg_path.stem}] interrupted at step {summary['step']}; no result written, the next "
              f"`exp run` resumes it from its checkpoint", flush=True)
        return summary
    result = {"name": spec["name"], "group": spec.get("group", spec["name"]), "seed": spec.get("seed"),
              "suite": suite, "config": str(cfg_path), "wall_seconds_last_session": time.time() - t0,
              "tokens": summary["step"] * cfg.train.batch_size * cfg.train.seq_len, **summary,
              "code_versions": versions, "spec": spec}
    result_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "metrics.jsonl", result_path.with_suffix(".metrics.jsonl"))
    atomic_write_text(result_path, json.dumps(result, indent=1) + "\n")
    return result


def live_runs(root: Path) -> dict[Path, int]:
    """{run folder: PID} of every run of any suite under `root` that a live process is training."""
    out = {}
    for run_dir in sorted((root / "runs").glob("*/*")):
        pid = running_pid(run_dir)
        if pid is not None:
            out[run_dir] = pid
    return out


def _child_state(returncode: int) -> str:
    """How a run's child process ended, as the suite log says it."""
    if returncode == 0:
        return "finished"
    if returncode > 128:  # the child checkpointed and exited 128 + N on signal N (see __main__)
        return f"interrupted (signal {returncode - 128}; resumed next time)"
    return f"FAILED (exit {returncode})"


def run_suite(root: Path, suite: str | list[str], jobs: int = 1, only: list[str] | None = None) -> int:
    """Run every unfinished config of the suite(s), `jobs` at a time, each in its own process.

    Several suites share one queue: text runs before fact-corpus runs, seed 0 of every variant (of
    every suite, in the order given) before seed 1, so a queue cut short still has one complete
    comparison. `jobs` bounds the trainings on the machine: runs other runners are training (of
    any suite under `root`) take slots too, and a run another process holds is left to it."""
    names = [suite] if isinstance(suite, str) else list(suite)
    todo, stale = [], []
    for rank, name in enumerate(names):
        for p in list_configs(root, name):
            if only and not any(key in p.stem for key in only):
                continue
            result = _paths(root, name, p.stem)[1]
            if result.exists():
                if result_is_stale(result, p):
                    stale.append(_stale_message(name, p.stem))
                continue
            todo.append((name, rank, p))
    for msg in stale:
        print(msg, flush=True)
    todo.sort(key=lambda t: (t[2].stem.startswith("facts-"), t[2].stem.rsplit("-s", 1)[-1], t[1], t[2].stem))
    print(f"suites {'+'.join(names)}: {len(todo)} run(s) to do, {jobs} at a time", flush=True)
    running: list[tuple[subprocess.Popen, Path]] = []
    failures = 0
    while todo or running:
        ours = {proc.pid for proc, _ in running}
        others = {d: pid for d, pid in live_runs(root).items() if pid not in ours}
        for t in list(todo):
            run_dir, result = _paths(root, t[0], t[2].stem)
            if result.exists() or run_dir in others:  # finished or being trained elsewhere
                todo.remove(t)
                print(f"left to another process: {t[0]}/{t[2].stem}", flush=True)
        while todo and len(running) + len(others) < jobs:
            name, _, cfg_path = todo.pop(0)
            cmd = [sys.executable, "-m", "ultramem.experiments.runner", str(root), name, str(cfg_path)]
            running.append((subprocess.Popen(cmd), cfg_path))
            print(f"started {name}/{cfg_path.stem}", flush=True)
        time.sleep(2)
        for proc, cfg_path in list(running):
            if proc.poll() is not None:
                running.remove((proc, cfg_path))
                failures += proc.returncode != 0  # an interrupted run is not finished either
                print(f"{_child_state(proc.returncode)} {cfg_path.stem}", flush=True)
    for msg in stale:  # again at the end, where a long log is read
        print(msg, flush=True)
    return 1 if failures or stale else 0


def start_background(root: Path, suite: str | list[str], jobs: int, only: list[str] | None) -> Path:
    """Detach a runner for the suite(s), one shared queue; returns the log path."""
    names = [suite] if isinstance(suite, str) else list(suite)
    log = root / "logs" / f"{'+'.join(names)}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "ultramem.cli", "exp", "run", *names, "--root", str(root),
           "--jobs", str(jobs)] + (["--only", *only] if only else [])
    with open(log, "a") as fh:
        subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return log


if __name__ == "__main__":  # one run in a child process: python -m ultramem.experiments.runner ROOT SUITE CFG
    summary = run_one(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
    if summary.get("interrupted"):
        sys.exit(128 + summary["interrupted"])  # the shell's convention for "killed by signal N"
