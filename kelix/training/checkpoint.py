"""Checkpoints a resume can trust: atomic ``last``, a final save at the end, a save on preemption.

* Every checkpoint is written to ``<name>.tmp`` and moved into place once complete, so a ``kill -9``
  or a node failure mid-write never leaves a half-written ``last.ckpt`` (file or sharded
  directory); the data is fsynced before the rename and the directory after it. A directory
  cannot replace another atomically: the previous one is moved to ``<name>.old`` first and deleted
  last; :func:`find_last_checkpoint` falls back to it if the process died in between.
* SIGTERM (preemption: SLURM, Kubernetes, spot instances) sets a flag; at the end of the next
  optimizer step every rank agrees on it, ``last`` is saved and the run exits with status 143.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from weakref import proxy

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from kelix.data.writer import fsync_path

log = logging.getLogger("kelix.training")
LAST = "last.ckpt"
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _sync_tree(path: str) -> None:
    """fsync a file, or every file and directory under ``path`` (DCP already syncs its shards; syncing
    a clean file again is cheap, and meta.pt and single-file checkpoints are written without it)."""
    if not os.path.isdir(path):
        fsync_path(path)
        return
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def move_into_place(tmp: str, final: str) -> None:
    """Replace ``final`` by the complete ``tmp`` (a file: atomically; a directory: via ``final.old``).

    ``tmp`` is synced to disk before it is renamed and the parent directory after: otherwise a power
    loss or node crash can leave the new name pointing at data that never reached the disk.
    """
    _sync_tree(tmp)
    parent = os.path.dirname(os.path.abspath(final))
    if os.path.isfile(tmp) and not os.path.isdir(final):
        os.replace(tmp, final)  # atomic on POSIX
        fsync_path(parent)
        return
    old = final + ".old"
    if os.path.lexists(final):
        _remove(old)
        os.replace(final, old)  # from here until the next line only `old` is complete: resume picks it
    os.replace(tmp, final)
    fsync_path(parent)
    _remove(old)


def find_last_checkpoint(ckpt_dir: str) -> str | None:
    """``ckpt_dir/last.ckpt`` if complete, else the previous one left by an interrupted swap, else None."""
    for name in (LAST, LAST + ".old"):
        path = os.path.join(ckpt_dir, name)
        if os.path.isfile(path) or os.path.isfile(os.path.join(path, "meta.pt")):
            return path
    return None


class KelixCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with atomic writes, a final ``last`` and a save on SIGTERM.

    All of ``ModelCheckpoint``'s options apply (``every_n_train_steps``, ``save_last``,
    ``save_top_k``, ``dirpath``...); the kit's CLI exposes them under ``checkpoint:``.

    Args:
        save_on_sigterm: on SIGTERM, save ``last`` at the end of the current optimizer step
            (every rank together) and exit with status 143; a resume with ``--ckpt_path last``
            continues from there.
    """

    def __init__(self, *args, save_on_sigterm: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.save_on_sigterm = save_on_sigterm
        self._sigterm = False
        self._step_at_batch_start = -1
        self._forwarded = False

    # -- atomic writes
    def _save_checkpoint(self, trainer, filepath: str) -> None:
        tmp = filepath + ".tmp"
        if trainer.is_global_zero:
            _remove(tmp)  # a leftover of a run killed mid-write
        trainer.strategy.barrier("kelix_ckpt_tmp")
        trainer.save_checkpoint(tmp, self.save_weights_only)
        trainer.strategy.barrier("kelix_ckpt_written")  # every shard is on disk
        if trainer.is_global_zero:
            move_into_place(tmp, filepath)
        trainer.strategy.barrier("kelix_ckpt_moved")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def on_train_end(self, trainer, pl_module):
        # Lightning saves `last` at the end only if nothing was saved before: keep it at the final step
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    # -- preemption
    def on_train_start(self, trainer, pl_module):
        if self.save_on_sigterm and _in_main_thread():
            # Replaces Lightning's handler, which broadcasts from inside the signal handler and
            # exits without a checkpoint; ours only sets a flag, checked at a step boundary.
            signal.signal(signal.SIGTERM, self._on_sigterm)
            self._trainer_ref = trainer

    def _on_sigterm(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint at the end of this optimizer step")
        self._sigterm = True
        launcher = getattr(self._trainer_ref.strategy, "launcher", None)
        if launcher is not None and not self._forwarded:  # ranks started by Lightning did not get it
            self._forwarded = True
            launcher.kill(signum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.save_on_sigterm or trainer.global_step == self._step_at_batch_start:
            return  # inside a gradient-accumulation window: wait for the optimizer step
        flag = torch.tensor(float(self._sigterm), device=trainer.strategy.root_device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="max")  # ranks may get the signal at different steps
        if flag.item() == 0:
            return
        if self._last_global_step_saved != trainer.global_step or self.last_model_path == "":
            # a real save (not save_last="link" to an older step), whatever save_last says
            path = self.format_checkpoint_name(self._monitor_candidates(trainer), self.CHECKPOINT_NAME_LAST)
            self.last_model_path = path
            self._save_checkpoint(trainer, path)
        msg = f"preempted (SIGTERM) at step {trainer.global_step}: checkpoint saved to {self.last_model_path}"
        log.warning("%s; resume with --ckpt_path last", msg)
        raise SIGTERMException(msg)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
