"""KelixModule: non-finite losses skip the whole optimizer step (or stop the run), as configured."""

import pytest
import torch
import yaml
from lightning.pytorch import Trainer, seed_everything

from kelix.data.datamodule import ShardDataModule
from kelix.training.module import NonFiniteLossError
from kelix.training.parallel import is_checkpointed
from tests.distributed.toy import ByteProcessor, ToyLM
from tests.training.conftest import ParamsPerStep, shard_recipe


def train(tmp_path, max_steps=5, accumulate=1, **model):
    seed_everything(0)
    cfg = shard_recipe(tmp_path, **model)
    from kelix.training.optim import OptimConfig

    init = dict(cfg["model"]["init_args"])
    module = ToyLM(**{**init, "optim": OptimConfig(**init["optim"])})
    data = ShardDataModule(**{**cfg["data"]["init_args"], "processor": ByteProcessor()})
    params = ParamsPerStep()
    trainer = Trainer(accelerator="cpu", max_steps=max_steps, accumulate_grad_batches=accumulate, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[params], default_root_dir=tmp_path)
    trainer.fit(module, data)
    return module, trainer, params.steps


def test_nonfinite_skips_the_whole_accumulation_window(tmp_path):
    # micro-batches 4 and 5 form optimizer step 2; only the second one is non-finite
    module, trainer, steps = train(tmp_path, max_steps=5, accumulate=2, nan_batches=[5])
    assert module.skipped_steps == 1 and trainer.global_step == 5
    for k, v in steps[3].items():
        assert torch.equal(v, steps[2][k]), k  # no update at all, not even from micro-batch 4's gradients
        assert not torch.equal(v, steps[4][k]) or not v.requires_grad
        assert torch.isfinite(v).all()
    state = trainer.optimizers[0].state
    assert {int(s["step"]) for s in state.values()} == {4}  # AdamW stepped 4 times in 5 steps
    assert trainer.callback_metrics["train/skipped_steps"] == 1


def test_nonfinite_stop_names_the_step(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 2 \(batch 2\): loss=inf.*nonfinite: skip"):
        train(tmp_path, nonfinite="stop", nan_batches=[2])


def test_too_many_skipped_steps_in_a_row_stop_the_run(tmp_path):
    with pytest.raises(NonFiniteLossError, match="3 non-finite steps in a row"):
        train(tmp_path, max_skipped_steps=2, nan_batches=[1, 2, 3])


def test_recipe_options_reach_the_module(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = shard_recipe(tmp_path, nonfinite="stop", activation_checkpointing=True, fsdp_param_dtype="bfloat16")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(cfg))
    from kelix.training.cli import run_lightning_cli

    cli = run_lightning_cli(["fit", "--config", str(tmp_path / "r.yaml"), "--trainer.max_steps", "1",
                             "--trainer.precision", "bf16-mixed", "--trainer.accumulate_grad_batches", "2"])
    m = cli.model
    assert m.nonfinite == "stop" and m.fsdp_param_dtype == "bfloat16" and cli.trainer.accumulate_grad_batches == 2
    assert [is_checkpointed(b) for b in m.parallel_blocks()] == [True, True]  # activation checkpointing on one device too
