"""DDP keeps working; FSDP2 with consolidated checkpoints resumes exactly; unsharded parameters are refused."""

import os

import pytest
import torch

from kelix.training.convert import read_sharded
from tests.distributed import launch
from tests.distributed.conftest import STEPS, recipe, write_recipe

pytestmark = pytest.mark.distributed


def test_ddp_trains_on_the_same_samples_with_the_same_nan_skip(reference, shards, tmp_path):
    keys = tmp_path / "keys"
    path = write_recipe(tmp_path, recipe(shards, keys, **{"trainer.strategy": "ddp"}))
    assert launch.run(["--config", path], tmp_path) == [0, 0], launch.logs(tmp_path)
    ckpt = torch.load(tmp_path / "runs/toy/version_0/checkpoints/last.ckpt", weights_only=True)  # one file
    assert ckpt["global_step"] == STEPS and ckpt["kelix"]["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    # the data order and the RNG draws do not depend on the strategy
    assert launch.key_sequence(keys) == launch.key_sequence(reference["keys"])


def test_fsdp2_consolidated_checkpoint_resumes_exactly(reference, shards, tmp_path):
    keys = tmp_path / "keys"
    over = {"trainer.strategy.init_args": {"save_distributed_checkpoint": False}}
    first = write_recipe(tmp_path, recipe(shards, keys, max_steps=STEPS // 2, **over))
    assert launch.run(["--config", first], tmp_path) == [0, 0], launch.logs(tmp_path)
    last = tmp_path / "runs/toy/version_0/checkpoints/last.ckpt"
    assert last.is_file()  # full weights and optimizer state gathered on rank 0
    full = write_recipe(tmp_path, recipe(shards, keys, **over))
    assert launch.run(["--config", full, "--ckpt_path", "last"], tmp_path) == [0, 0], launch.logs(tmp_path)
    got = torch.load(last, weights_only=True)["state_dict"]
    want = read_sharded(reference["ckpt"])
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert launch.key_sequence(keys) == launch.key_sequence(reference["keys"])


def test_a_parameter_outside_the_sharded_modules_is_refused(shards, tmp_path):
    path = write_recipe(tmp_path, recipe(shards, tmp_path / "keys", **{
        "trainer.devices": 1, "model.class_path": "tests.distributed.toy.ToyLMWithLooseParameter"}))
    assert launch.run(["--config", path], tmp_path, world=1) == [1]
    log = launch.logs(tmp_path)
    assert "FSDP2: 1 parameter(s) are in no parallel_blocks()/parallel_roots() module, e.g. 'scale'" in log
    assert not os.path.exists(tmp_path / "runs/toy/version_0/checkpoints")
