"""LightningCLI for the kit: any LightningModule / LightningDataModule by ``class_path``."""

from __future__ import annotations

import os

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from kelix.training.callbacks import DataHealth, Throughput

DEFAULT_RUN_NAME = "kelix"


class KelixCLI(LightningCLI):
    """LightningCLI with the kit's defaults.

    * ``model`` and ``data`` are chosen by ``class_path`` (a user's own classes included);
    * logs go to TensorBoard under ``runs/<name>/version_N`` (``name`` defaults to the recipe's
      file name) with the resolved config saved beside them;
    * checkpointing (``save_last``), learning-rate, throughput and data-health monitors are always on
      and configurable under ``checkpoint:``, ``lr_monitor:``, ``throughput:`` and ``data_health:``.
    """

    def add_arguments_to_parser(self, parser):
        parser.add_argument("--name", type=str | None, default=None,
                            help="run name: logs go to runs/<name>/version_N (default: the first recipe's file name)")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 500,
                             "checkpoint.save_top_k": 1})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(Throughput, "throughput")
        parser.add_lightning_class_args(DataHealth, "data_health")

    def before_instantiate_classes(self):
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        name = cfg.get("name")
        if not name:
            configs = cfg.get("config") or []
            first = str(configs[0]) if configs else ""
            name = os.path.splitext(os.path.basename(first))[0] if first else None
        logger = cfg.get("trainer", {}).get("logger") if hasattr(cfg, "get") else None
        init = getattr(logger, "init_args", None) if logger is not None and not isinstance(logger, bool) else None
        if name and init is not None and getattr(init, "name", None) == DEFAULT_RUN_NAME:
            init.name = name


def run_lightning_cli(args: list[str]) -> KelixCLI:
    return KelixCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf"},
        trainer_defaults={
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs", "name": DEFAULT_RUN_NAME},
            },
        },
        args=args,
    )
