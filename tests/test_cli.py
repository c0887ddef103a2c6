"""The `kelix` command: help, config parsing and merging, and a user's own DataModule through `kelix fit`."""

import os
import subprocess
import sys

import lightning.pytorch as pl
import torch
import yaml
from torch.utils.data import DataLoader

from kelix.cli import KIT_VERBS, LIGHTNING_VERBS, main
from kelix.training.module import KelixModule


class TinyRegressor(KelixModule):
    """A linear model: the smallest thing a recipe can train."""

    def __init__(self, features: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.net = torch.nn.Linear(features, 1)

    def step(self, batch, split):
        pred = self.net(batch["x"]).squeeze(-1)
        return {"loss": torch.nn.functional.mse_loss(pred, batch["y"]), "pred_mean": pred.mean()}


class SumDataModule(pl.LightningDataModule):
    """A user's own DataModule (y = sum of x), plugged by class_path."""

    def __init__(self, samples: int = 64, batch_size: int = 8, features: int = 4):
        super().__init__()
        self.samples, self.batch_size, self.features = samples, batch_size, features

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(self.samples, self.features, generator=g)
        return DataLoader([{"x": a, "y": a.sum()} for a in x], batch_size=self.batch_size)


def recipe(tmp_path, **trainer):
    cfg = {
        "model": {"class_path": f"{__name__}.TinyRegressor",
                  "init_args": {"optim": {"lr": 0.05, "schedule": "constant"}}},
        "data": {"class_path": f"{__name__}.SumDataModule"},
        "trainer": {"max_steps": 30, "accelerator": "cpu", "log_every_n_steps": 5, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path), **trainer},
    }
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_help_lists_every_verb_without_importing_heavy_libraries():
    code = ("import sys; from kelix.cli import main; main(['--help']); "
            "heavy = [m for m in ('torch', 'lightning', 'transformers', 'diffusers') if m in sys.modules]; "
            "assert not heavy, heavy")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for verb in (*LIGHTNING_VERBS, *KIT_VERBS):
        assert f"  {verb} " in out


def test_eval_list_answers_without_heavy_libraries():
    code = ("import sys; from kelix.cli import main; assert main(['eval', 'list']) == 0; "
            "heavy = [m for m in ('torch', 'lightning', 'transformers', 'diffusers') if m in sys.modules]; "
            "assert not heavy, heavy")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "mmbench-en" in out and "synthetic-t2i" in out
    assert "  eval " in subprocess.run([sys.executable, "-m", "kelix.cli", "--help"], capture_output=True,
                                       text=True, check=True).stdout


def test_every_kit_verb_resolves_to_a_function():
    import importlib

    for verb, (target, _) in KIT_VERBS.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), verb


def test_unknown_verb_is_a_clear_error(capsys):
    assert main(["fitt"]) == 2
    assert "unknown verb 'fitt'" in capsys.readouterr().err


def test_print_config_merges_several_configs(tmp_path, capsys):
    base = recipe(tmp_path)
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"model": {"init_args": {"features": 4, "optim": {"lr": 0.5}}},
                                        "trainer": {"max_steps": 7}}))
    try:
        main(["fit", "--config", str(base), "--config", str(override), "--print_config"])
    except SystemExit as e:
        assert e.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["trainer"]["max_steps"] == 7
    assert cfg["model"]["init_args"]["optim"]["lr"] == 0.5
    assert cfg["model"]["init_args"]["optim"]["schedule"] == "constant"  # kept from the first file
    assert cfg["checkpoint"]["save_last"] is True
    assert cfg["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.TensorBoardLogger"


def test_custom_datamodule_trains_through_kelix_fit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = recipe(tmp_path)
    main(["fit", "--config", str(path), "--trainer.max_steps", "40"])
    run = tmp_path / "runs" / "toy" / "version_0"
    assert (run / "config.yaml").is_file()  # the resolved config sits beside the logs
    assert (run / "checkpoints" / "last.ckpt").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["class_path"].endswith("SumDataModule")
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 40
    # the model learned y = sum(x): weights near 1
    assert torch.allclose(ckpt["state_dict"]["net.weight"], torch.ones(1, 4), atol=0.15)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/pred_mean", "train/grad_norm", "lr/default", "perf/samples_per_s"} <= tags
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses[-1] < losses[0] / 10


def test_name_flag_sets_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(recipe(tmp_path)), "--name", "my-run", "--trainer.max_steps", "2"])
    assert os.path.isdir(tmp_path / "runs" / "my-run" / "version_0")
