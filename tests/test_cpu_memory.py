"""cpu_memory.keep_freed_memory: after it, a freed large tensor's pages are reused instead of
faulted in fresh; the trainer applies it on CPU unless train.cpu_keep_freed is off."""

import subprocess
import sys

import pytest

import ultramem.train as train_mod
from ultramem.cpu_memory import _libc

# Allocate, touch and free a 64 MB tensor four times (as a training step does its temporaries):
# minor page faults of the last round. (glibc settles into reusing the block from the third round.)
PROBE = """
import resource, sys, torch
from ultramem.cpu_memory import keep_freed_memory
torch.set_num_threads(1)
if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 * 2**20).fill_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(_libc() is None, reason="needs glibc (Linux)")
def test_freed_pages_are_reused_instead_of_faulted_in_again():
    pages = 64 * 2**20 // 4096
    assert _faults("default") > pages // 2  # unmapped on every free: every page faults again
    assert _faults("keep") < pages // 20  # kept: the last round reuses the earlier rounds' pages


def _tiny_cfg(tmp_path, keep: bool):
    return train_mod.RunConfig.from_dict({
        "model": {"dim": 16, "n_layers": 1, "n_heads": 2},
        "data": {"source": "facts", "num_people": 5, "vocab_size": 300},
        "train": {"out_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"), "steps": 1,
                  "batch_size": 2, "seq_len": 16, "warmup_steps": 0, "eval_every": 0, "fact_queries": 0,
                  "progress": False, "device": "cpu", "cpu_keep_freed": keep}})


@pytest.mark.parametrize("keep", [True, False])
def test_trainer_applies_it_on_cpu_unless_switched_off(tmp_path, monkeypatch, keep):
    calls = []
    monkeypatch.setattr(train_mod, "keep_freed_memory", lambda: calls.append(1) or True)
    train_mod.train(_tiny_cfg(tmp_path, keep), log=lambda *_: None)
    assert calls == ([1] if keep else [])


def test_the_option_is_typed():
    with pytest.raises(ValueError, match="cpu_keep_freed"):
        train_mod.TrainConfig.from_dict({"cpu_keep_freed": "maybe"})
