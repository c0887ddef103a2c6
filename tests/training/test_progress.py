"""What `kelix fit` prints: a progress bar in optimizer steps out of max_steps, parameters per part."""

import logging

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from torch import nn
from torch.utils.data import DataLoader

from kelix.training.cli import run_lightning_cli
from kelix.training.progress import PartSummary, StepProgressBar, format_parts, part_counts
from tests.training.conftest import shard_recipe


class _Probe(pl.Callback):
    """The train bar's count and total at the start of training and after each batch."""

    def __init__(self):
        self.seen = []

    def on_train_start(self, trainer, pl_module):
        bar = trainer.progress_bar_callback.train_progress_bar
        self.start = (bar.n, bar.total, bar.desc)

    def on_train_batch_end(self, trainer, pl_module, *args):
        bar = trainer.progress_bar_callback.train_progress_bar
        self.seen.append((trainer.global_step, bar.n, bar.total))


def _fit(tmp_path, max_steps, accumulate=1, ckpt=None, max_epochs=None, batches=64):
    probe = _Probe()
    trainer = pl.Trainer(max_steps=max_steps, max_epochs=max_epochs, accumulate_grad_batches=accumulate,
                         callbacks=[StepProgressBar(), probe], logger=False, enable_checkpointing=False,
                         enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0)
    trainer.fit(BoringModel(), DataLoader(RandomDataset(32, batches), batch_size=2), ckpt_path=ckpt)
    return trainer, probe


def test_bar_counts_optimizer_steps_out_of_max_steps(tmp_path, capsys):
    # 3 micro-batches per step; an epoch of 8 batches ends mid-step, so the run spans 3 epochs
    trainer, probe = _fit(tmp_path, max_steps=7, accumulate=3, batches=16)
    assert probe.start == (0, 7, "Steps: ")
    assert [(step, n) for step, n, _ in probe.seen] == [(step, step) for step, _, _ in probe.seen]
    assert probe.seen[-1] == (7, 7, 7)
    assert {total for _, _, total in probe.seen} == {7}  # not reset per epoch
    err = capsys.readouterr()
    assert "Epoch 0/-2" not in err.out + err.err and "epoch=2" in err.out + err.err


def test_resumed_bar_starts_at_the_checkpoints_step(tmp_path):
    trainer, _ = _fit(tmp_path, max_steps=3)
    trainer.save_checkpoint(tmp_path / "s3.ckpt")
    _, probe = _fit(tmp_path, max_steps=5, ckpt=str(tmp_path / "s3.ckpt"))
    assert probe.start == (3, 5, "Steps: ") and probe.seen[-1] == (5, 5, 5)


def test_epoch_based_runs_keep_lightnings_bar(tmp_path):
    _, probe = _fit(tmp_path, max_steps=-1, max_epochs=2, batches=8)
    assert [n for _, n, _ in probe.seen] == [1, 2, 3, 4] * 2 and probe.seen[-1][2] == 4  # batches per epoch


class _Parts(nn.Module):
    """A frozen encoder, and an LM whose head shares the embedding table (a tied table)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4, bias=False)).requires_grad_(False)
        self.lm = nn.Module()
        self.lm.embed = nn.Embedding(10, 4)
        self.lm.head = nn.Linear(4, 10)
        self.lm.head.weight = self.lm.embed.weight
        self.lm.scale = nn.Parameter(torch.ones(2))
        self.buffers_only = nn.BatchNorm1d(4, affine=False)
        self.gate = nn.Parameter(torch.zeros(5))


def test_part_counts_by_hand():
    m = _Parts()
    rows = part_counts(m, depth=2)
    assert rows == [
        ("gate", 5, 0),  # the root's own parameter first, as torch lists them
        ("encoder", 0, 3 * 4 + 4 + 16), ("encoder.0", 0, 16), ("encoder.1", 0, 16),
        ("lm", 40 + 10 + 2, 0), ("lm.embed", 40, 0), ("lm.head", 10, 0),  # head: only its bias; lm: + scale
        ("total", 57, 32),
    ]
    assert rows[-1][1] + rows[-1][2] == sum(p.numel() for p in m.parameters())  # torch's de-duplicated count
    assert [r[0] for r in part_counts(m, depth=1)] == ["gate", "encoder", "lm", "total"]
    text = format_parts(rows)
    assert text.splitlines()[0].split() == ["part", "trainable", "frozen"]
    assert text.splitlines()[-1].split() == ["total", "57", "32"] and "  head" in text


def _cli(tmp_path, monkeypatch, **trainer):
    monkeypatch.chdir(tmp_path)
    cfg = shard_recipe(tmp_path, max_steps=2)
    for k in ("enable_progress_bar", "enable_model_summary"):
        cfg["trainer"].pop(k)
    cfg["trainer"].update(trainer)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(cfg))
    return run_lightning_cli(["--config", "r.yaml"], run=False)


def test_fit_shows_step_bar_and_part_summary_not_lightnings(tmp_path, monkeypatch, capfd, caplog):
    cli = _cli(tmp_path, monkeypatch)
    trainer = cli.trainer
    assert isinstance(trainer.progress_bar_callback, StepProgressBar)
    assert [type(c) for c in trainer.callbacks if isinstance(c, (ModelSummary, PartSummary))] == [PartSummary]
    log = logging.getLogger("lightning.pytorch")  # Lightning's messages stop there (no propagation)
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero"):
        caplog.set_level(logging.INFO, logger=name)  # whatever level an earlier test left
    log.addHandler(caplog.handler)
    try:
        trainer.fit(cli.model, datamodule=cli.datamodule)
    finally:
        log.removeHandler(caplog.handler)
    out = capfd.readouterr()
    text = out.out + out.err + caplog.text
    assert "FLOPs" not in text and "Trainer already configured" not in text and "Epoch 0/" not in text
    lm = trainer.lightning_module.lm
    trainable = sum(p.numel() for p in lm.parameters())
    assert format_parts(part_counts(trainer.lightning_module)) in text
    assert part_counts(trainer.lightning_module)[0] == ("lm", trainable, 0)


@pytest.mark.parametrize("flag", ["enable_progress_bar", "enable_model_summary"])
def test_trainer_flags_still_turn_them_off(tmp_path, monkeypatch, flag):
    trainer = _cli(tmp_path, monkeypatch, **{flag: False}).trainer
    if flag == "enable_progress_bar":
        assert trainer.progress_bar_callback is None
    else:
        assert not any(isinstance(c, (ModelSummary, PartSummary)) for c in trainer.callbacks)
