"""Shared tiny shards, the 2-rank FSDP2 recipe and its uninterrupted reference run."""

from __future__ import annotations

import os

import pytest
import yaml

from tests.conftest import text_records, write_shard
from tests.distributed import launch

STEPS = 8  # optimizer steps of the full run
ACCUMULATE = 2  # micro-batches per optimizer step
EVERY = 2  # checkpoint every EVERY steps
NAN_STEP = 3  # rank 1 alone sees a NaN loss at this step: both ranks must skip it


def recipe(shards: str, key_dir, max_steps: int = STEPS, **over) -> dict:
    """FSDP2 on 2 CPU ranks, bf16 autocast, activation checkpointing, gradient accumulation, NaN skip."""
    cfg = {
        "model": {"class_path": "tests.distributed.toy.ToyLM", "init_args": {
            "optim": {"lr": 3e-3, "warmup_steps": 2, "total_steps": STEPS, "schedule": "cosine", "grad_clip": 1.0},
            "activation_checkpointing": True, "fsdp_param_dtype": "bfloat16",
            "nan_at_step": NAN_STEP, "nan_rank": 1}},
        "data": {"class_path": "kelix.data.datamodule.ShardDataModule", "init_args": {
            "train": shards, "processor": {"class_path": "tests.distributed.toy.ByteProcessor"},
            "batch_size": 2, "num_workers": 1, "shuffle_buffer": 8, "seed": 3}},
        "trainer": {"accelerator": "cpu", "devices": 2, "precision": "bf16-mixed",
                    "strategy": {"class_path": "kelix.training.parallel.FSDP2Strategy"},
                    "max_steps": max_steps, "accumulate_grad_batches": ACCUMULATE, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "callbacks": [{"class_path": "tests.distributed.toy.KeyRecorder",
                                   "init_args": {"out_dir": str(key_dir)}}]},
        "checkpoint": {"every_n_train_steps": EVERY},
    }
    for dotted, value in over.items():  # "trainer.devices": 1
        node = cfg
        *path, last = dotted.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


def write_recipe(run_dir, cfg: dict, name: str = "toy") -> str:
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("dist_shards")
    for i in range(4):
        write_shard(root / f"text-{i:03d}.tar", text_records(f"t{i}_", 40))
    return str(root / "text-{000..003}.tar")


@pytest.fixture(scope="session")
def reference(shards, tmp_path_factory):
    """The uninterrupted run: its directory, key directory and final ``last.ckpt``."""
    run_dir = tmp_path_factory.mktemp("reference")
    key_dir = run_dir / "keys"
    path = write_recipe(run_dir, recipe(shards, key_dir))
    codes = launch.run(["--config", path], run_dir)
    assert codes == [0, 0], launch.logs(run_dir)
    ckpt = run_dir / "runs" / "toy" / "version_0" / "checkpoints" / "last.ckpt"
    return {"dir": run_dir, "keys": key_dir, "ckpt": str(ckpt)}
