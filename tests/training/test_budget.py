"""DataBudget: cumulative samples/tokens in TensorBoard, a stop at max_tokens / max_samples, kept over a resume."""

import glob

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from kelix.training.budget import DataBudget
from kelix.training.module import KelixModule
from kelix.training.optim import OptimConfig

TOKENS = [5, 7, 11, 13]  # tokens of batch i % 4; every batch has 3 samples


class Tiny(KelixModule):
    def __init__(self):
        super().__init__(optim=OptimConfig(lr=1e-2, weight_decay=0.0, schedule="constant"))
        self.w = torch.nn.Linear(2, 1)

    def step(self, batch, split):
        return {"loss": self.w(batch["x"]).pow(2).mean()}


def batches(n):
    return [{"x": torch.ones(3, 2), "batch_size": 3, "num_tokens": TOKENS[i % 4]} for i in range(n)]


def fit(tmp_path, budget, max_steps=100, ckpt=None, every=2, accumulate=1):
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, log_every_n_steps=every, callbacks=[budget],
                         logger=TensorBoardLogger(str(tmp_path), name="run", version=0), enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, accumulate_grad_batches=accumulate)
    trainer.fit(Tiny(), train_dataloaders=torch.utils.data.DataLoader(batches(400), batch_size=None),
                ckpt_path=ckpt)
    return trainer


def logged(tmp_path, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for f in sorted(glob.glob(str(tmp_path / "run/version_0/events.out.tfevents.*"))):
        ea = EventAccumulator(f, size_guidance={"scalars": 0})
        ea.Reload()
        if tag in ea.Tags()["scalars"]:
            out.update({e.step: e.value for e in ea.Scalars(tag)})
    return out


def test_stops_at_the_first_logging_step_past_max_tokens_and_logs_the_running_total(tmp_path):
    # 36 tokens per 4 steps: after step 10 (batches 0..9) 5+7+11+13+5+7+11+13+5+7 = 84 < 100, step 12: 108
    budget = DataBudget(max_tokens=100)
    trainer = fit(tmp_path, budget)
    assert trainer.global_step == 12
    assert (budget.samples, budget.tokens) == (36, 108)
    tokens = logged(tmp_path, "data/tokens")
    assert tokens[1] == 5 + 7 and tokens[11] == 108  # logged at steps 2 and 12 (Lightning's step is 0-based)
    assert len(tokens) == 6


def test_max_samples_counts_micro_batches_of_every_accumulation_window(tmp_path):
    budget = DataBudget(max_samples=30)  # 3 samples a batch, 2 batches an optimizer step: 6 a step
    trainer = fit(tmp_path, budget, accumulate=2, every=1)
    assert trainer.global_step == 5 and budget.samples == 30


def test_max_steps_still_ends_a_run_under_budget(tmp_path):
    budget = DataBudget(max_samples=10**9, max_tokens=10**12)
    assert fit(tmp_path, budget, max_steps=4).global_step == 4
    assert budget.tokens == 36 and not budget.reached()


def test_a_resumed_run_keeps_counting(tmp_path):
    first = DataBudget()
    trainer = fit(tmp_path, first, max_steps=4)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    again = DataBudget(max_tokens=100)
    trainer = fit(tmp_path / "second", again, ckpt=str(tmp_path / "a.ckpt"))
    # the resumed stream restarts at batch 0 here (a plain list), so steps 5.. read 5, 7, 11...: 36 + 72 = 108
    assert (trainer.global_step, again.tokens, again.samples) == (12, 108, 36)


def test_bad_budget_is_a_one_line_error():
    with pytest.raises(ValueError, match="budget.max_tokens must be positive, got 0"):
        DataBudget(max_tokens=0)
