"""A process that kills itself at a known point of a training run, however loaded the machine is."""

from __future__ import annotations

import sys

KILL_AFTER_FIRST_CHECKPOINT = """
import logging, os, runpy, signal, sys

class KillAfterFirstCheckpoint(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith("checkpoint: epoch 1 of"):
            os.kill(os.getpid(), signal.SIGKILL)

# the trainer's logger: "training.retrain" when imported, "__main__" when it is the module run
for name in ("training.retrain", "__main__"):
    logging.getLogger(name).addHandler(KillAfterFirstCheckpoint())
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def killed_after_first_checkpoint(module: str, *args: str) -> list[str]:
    """``python -m MODULE ARGS`` that kills itself with SIGKILL as soon as the trainer wrote its
    first checkpoint (a logging handler on the checkpoint's record, emitted right after the rename)."""
    return [sys.executable, "-c", KILL_AFTER_FIRST_CHECKPOINT, module, *args]
