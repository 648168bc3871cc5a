"""`ultramem train` under torchrun, with rank 1 killed at one step of the first attempt.

Used by tests/test_distributed.py: `torchrun --max-restarts 1 tests/dist_train_worker.py CRASH_STEP
<ultramem train args>`; CRASH_STEP 0 never crashes. torchrun restarts every worker after the
kill, and the run resumes from its last DCP checkpoint (train.resume=auto).
"""

from __future__ import annotations

import faulthandler
import os
import sys

from ultramem.cli import main
from ultramem.distributed import trainer


def crash_at(step: int) -> None:
    original = trainer._train_step

    def step_or_die(r):
        if r.step + 1 == step and r.rank == 1 and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
            os._exit(17)  # a hard kill: no checkpoint, no cleanup
        return original(r)

    trainer._train_step = step_or_die


if __name__ == "__main__":
    faulthandler.dump_traceback_later(100, exit=True)  # a hang prints every stack and fails fast
    if int(sys.argv[1]):
        crash_at(int(sys.argv[1]))
    code = main(sys.argv[2:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip teardown: gloo's threads sometimes abort there (see dist_worker.py)
