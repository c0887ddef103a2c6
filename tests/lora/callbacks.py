"""Callbacks of the LoRA run tests: each step's loss to a file, and a kill -9 of the run at a given step."""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl


class LossLog(pl.Callback):
    """Append ``<global_step> <loss>`` (the exact float) after every optimizer step."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step} {float(outputs['loss'].detach())!r}\n")


class KillAt(pl.Callback):
    """SIGKILL this process at the start of optimizer step ``step`` (nothing gets saved)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
