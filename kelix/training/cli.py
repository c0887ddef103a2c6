"""LightningCLI for the kit: any LightningModule / LightningDataModule by ``class_path``."""

from __future__ import annotations

import functools
import glob
import logging
import logging.handlers
import os
import re
import sys
import warnings
from unittest import mock

from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import LearningRateMonitor, ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from kelix.training.budget import DataBudget
from kelix.training.callbacks import DataHealth, Throughput
from kelix.training.checkpoint import PREEMPTED_EXIT_CODE, KelixCheckpoint, find_last_checkpoint
from kelix.training.parallel import FSDP2Strategy  # noqa: F401  (registers strategy: fsdp2)
from kelix.training.progress import PartSummary, StepProgressBar

DEFAULT_RUN_NAME = "kelix"

# Library noise that says nothing about the run (deprecations inside torchdata/Lightning, an advert).
for _message in (".*set_vital.*", ".*LeafSpec.*", ".*does not have many workers.*"):
    warnings.filterwarnings("ignore", message=_message)


class _NoAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdverts())


class KelixCLI(LightningCLI):
    """LightningCLI with the kit's defaults.

    * ``model`` and ``data`` are chosen by ``class_path`` (a user's own classes included);
    * logs go to TensorBoard under ``runs/<name>/version_N`` (``name`` defaults to the recipe's
      file name) with the resolved config saved beside them;
    * checkpointing (:class:`~kelix.training.checkpoint.KelixCheckpoint`: atomic ``last.ckpt``,
      saved on SIGTERM; options under ``checkpoint:``), the learning-rate monitor (``lr_monitor:``),
      throughput and data-health monitors and the data budget (``budget:``, cumulative ``data/tokens``,
      optional ``max_samples`` / ``max_tokens`` stop) are always on;
    * the progress bar counts optimizer steps against ``max_steps``
      (:class:`~kelix.training.progress.StepProgressBar`) and the summary lists parameters per part,
      trainable and frozen (:class:`~kelix.training.progress.PartSummary`), unless the trainer's
      ``enable_progress_bar`` / ``enable_model_summary`` are false or ``trainer.callbacks`` has its own;
    * ``fit --ckpt_path last`` resumes the newest ``runs/<name>/version_N`` holding a
      ``checkpoints/last.ckpt`` and keeps logging into that same directory.
    """

    def add_arguments_to_parser(self, parser):
        parser.add_argument("--name", type=str | None, default=None,
                            help="run name: logs go to runs/<name>/version_N (default: the first recipe's file name)")
        parser.add_lightning_class_args(KelixCheckpoint, "checkpoint")
        # save_top_k 0: only `last` is written (a second copy of each checkpoint would double the I/O)
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 500,
                             "checkpoint.save_top_k": 0, "checkpoint.enable_version_counter": False})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(Throughput, "throughput")
        parser.add_lightning_class_args(DataHealth, "data_health")
        parser.add_lightning_class_args(DataBudget, "budget")  # budget.max_samples / max_tokens (Table 5's units)

    def parse_arguments(self, parser, args):
        # `kelix fit ...` hands its whole command line over as ``args``; LightningCLI warns whenever
        # sys.argv holds arguments too. Only while parsing: DDP's launcher re-runs sys.argv for each rank.
        with mock.patch.object(sys, "argv", sys.argv[:1]):
            try:
                super().parse_arguments(parser, args)
            except Exception as e:
                e.kelix_setup, e.kelix_options = True, _options(parser, args)  # kelix.console.errors reads these
                raise

    def _set_seed(self):
        # "Seed set to 0" on every start says nothing the saved config does not
        with mock.patch("lightning.pytorch.cli.seed_everything", functools.partial(seed_everything, verbose=False)):
            super()._set_seed()

    def instantiate_classes(self):
        # the kit's and Lightning's log lines while building wait: on an input error, the one line says it all
        held = logging.handlers.BufferingHandler(capacity=10_000)
        loggers = [logging.getLogger(n) for n in ("kelix", "lightning.pytorch", "lightning.fabric")]
        saved = [(lg.handlers, lg.propagate) for lg in loggers]
        for lg in loggers:
            lg.handlers, lg.propagate = [held], False
        try:
            self._before_instantiate()
            super().instantiate_classes()
            check = getattr(self.datamodule, "check_inputs", None)  # shard patterns: before any work
            if callable(check) and self.subcommand:
                check(self.subcommand)
        except Exception as e:  # a recipe's input, found missing or wrong while building: the user's error
            e.kelix_setup = True
            e.kelix_config = self.config[self.subcommand] if self.subcommand else self.config
            raise
        finally:
            for lg, (handlers, propagate) in zip(loggers, saved, strict=True):
                lg.handlers, lg.propagate = handlers, propagate
        for record in held.buffer:
            logging.getLogger(record.name).handle(record)

    def _run_subcommand(self, subcommand):
        try:
            super()._run_subcommand(subcommand)
        except Exception as e:  # inside training: a bug keeps its traceback
            e.kelix_in_run = True
            raise

    def _parse_ckpt_path(self):
        # Lightning reads a checkpoint file whole, on every rank, only to look for hyper-parameters
        # (tens of GB at paper scale): memory-map it, and defer to Lightning only if it has some.
        import torch

        sub = self.config.get("subcommand")
        path = self.config[sub].get("ckpt_path") if sub else None
        if not (path and os.path.isfile(path)):
            return
        if torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters"):
            super()._parse_ckpt_path()

    def _instantiate_trainer(self, config, callbacks):
        own = config.get("callbacks") or []
        given = [*(own if isinstance(own, list) else [own]), *callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            callbacks = [*callbacks, StepProgressBar()]
        if config.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary) for c in given):
            callbacks = [*callbacks, PartSummary()]
            config = {**config, "enable_model_summary": False}  # instead of Lightning's, not beside it
        return super()._instantiate_trainer(config, callbacks)

    def _before_instantiate(self):
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
        if self.subcommand == "fit" and cfg.get("ckpt_path") == "last":
            cfg.ckpt_path = resolve_last(cfg, init)


def _options(parser, args) -> list[str]:
    """The option strings of the subcommand's parser (for a did-you-mean on a misspelled key)."""
    action = getattr(parser, "_subcommands_action", None)
    sub = next((a for a in args or () if action is not None and a in action.choices), None)
    target = action.choices[sub] if sub else parser
    return [s for a in target._actions for s in a.option_strings]


def _version_dirs(root: str) -> list[tuple[int, str]]:
    found = []
    for d in glob.glob(os.path.join(glob.escape(root), "version_*")):
        m = re.fullmatch(r"version_(\d+)", os.path.basename(d))
        if m and os.path.isdir(d):
            found.append((int(m.group(1)), d))
    return sorted(found, reverse=True)


def resolve_last(cfg, logger_init) -> str:
    """The checkpoint ``--ckpt_path last`` means; points the logger at its run directory.

    ``checkpoint.dirpath`` if set, else the newest ``<save_dir>/<name>/version_N/checkpoints``
    holding a complete ``last.ckpt``. No checkpoint is an error (Lightning would silently start
    from scratch).
    """
    dirpath = cfg.get("checkpoint", {}).get("dirpath")
    if dirpath:
        path = find_last_checkpoint(str(dirpath))
        if path is None:
            raise FileNotFoundError(f"--ckpt_path last: no last.ckpt in checkpoint.dirpath {str(dirpath)!r}")
        return os.path.abspath(path)
    if logger_init is None or getattr(logger_init, "save_dir", None) is None:
        raise ValueError("--ckpt_path last needs the TensorBoard logger (runs/<name>/version_N) or "
                         "checkpoint.dirpath; otherwise give the checkpoint's path")
    root = os.path.join(str(logger_init.save_dir), str(logger_init.name or ""))
    wanted = getattr(logger_init, "version", None)
    for version, d in _version_dirs(root):
        if wanted is not None and str(wanted) not in (str(version), os.path.basename(d)):
            continue
        path = find_last_checkpoint(os.path.join(d, "checkpoints"))
        if path is not None:
            logger_init.version = version  # keep logging (and checkpointing) into the same run
            return os.path.abspath(path)
    raise FileNotFoundError(f"--ckpt_path last: no checkpoint found under {root}/version_*/checkpoints/last.ckpt; "
                            "start without --ckpt_path, or give the checkpoint's path")


def run_lightning_cli(args: list[str], run: bool = True) -> KelixCLI:
    """The ``kelix fit|validate|test|predict`` command line (``run=False``: build everything, run nothing,
    ``args`` without the subcommand)."""
    try:
        return KelixCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False},  # one line: kelix.console.errors
            trainer_defaults={
                "logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": DEFAULT_RUN_NAME},
                },
            },
            args=args,
            run=run,
        )
    except SIGTERMException as e:
        # preempted: `last` is saved; a distinct status tells schedulers and scripts the run did not finish
        raise SystemExit(PREEMPTED_EXIT_CODE) from e
