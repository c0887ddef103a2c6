"""Single-process recipes on tiny shards for the training tests (the 2-rank ones are in tests/distributed)."""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl

from tests.conftest import text_records, write_shard


def shard_recipe(tmp_path, max_steps: int = 6, every: int = 2, workers: int = 0, **model) -> dict:
    """``tests.distributed.toy.ToyLM`` on 2 tiny text shards, one CPU process, keys recorded in tmp_path/keys."""
    root = tmp_path / "shards"
    if not root.exists():
        os.makedirs(root)
        for i in range(2):
            write_shard(root / f"s-{i}.tar", text_records(f"s{i}_", 30))
    return {
        "model": {"class_path": "tests.distributed.toy.ToyLM",
                  "init_args": {"optim": {"lr": 3e-3, "total_steps": 12, "warmup_steps": 1}, **model}},
        "data": {"class_path": "kelix.data.datamodule.ShardDataModule", "init_args": {
            "train": str(root / "s-{0..1}.tar"), "processor": {"class_path": "tests.distributed.toy.ByteProcessor"},
            "batch_size": 2, "num_workers": workers, "shuffle_buffer": 6}},
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": max_steps, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "callbacks": [{"class_path": "tests.distributed.toy.KeyRecorder",
                                   "init_args": {"out_dir": str(tmp_path / "keys")}}]},
        "checkpoint": {"every_n_train_steps": every},
    }


class SignalAt(pl.Callback):
    """Send SIGTERM to this process at the start of training step ``step`` (a preemption)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class ParamsPerStep(pl.Callback):
    """Record a copy of every parameter after each optimizer step: ``steps[global_step] = {name: tensor}``."""

    def __init__(self):
        self.steps: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.named_parameters()}
