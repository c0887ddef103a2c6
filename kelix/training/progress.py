"""What ``kelix fit`` prints: a progress bar in optimizer steps, and parameters per part.

Lightning's defaults read badly on the kit's step-based runs: the bar says ``Epoch 0/-2`` (``max_epochs``
is -1) and counts batches, not optimizer steps; the model summary has a FLOPs column of zeros and counts
a tied table once per module that holds it.
"""

from __future__ import annotations

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import _update_n
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from torch import nn


def step_based(trainer) -> bool:
    """A run bounded by ``max_steps`` alone (epochs unbounded): the kit's recipes."""
    return trainer.max_steps is not None and trainer.max_steps > 0 and trainer.max_epochs in (None, -1)


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, which on step-based runs shows optimizer steps out of ``max_steps``.

    The count is ``trainer.global_step``, so it starts where a resumed run left off and advances once
    per optimizer step under gradient accumulation; the epoch (a pass over the data) goes to the postfix.
    Epoch-based runs keep Lightning's bar. Options as :class:`~lightning.pytorch.callbacks.TQDMProgressBar`.
    """

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        if step_based(trainer):
            bar = self.train_progress_bar
            bar.reset(total=trainer.max_steps)
            bar.initial = trainer.global_step
            _update_n(bar, trainer.global_step)
            bar.set_description("Steps")

    def on_train_epoch_start(self, trainer, *args):
        if not step_based(trainer):  # one bar over the whole run: not reset at each pass over the data
            super().on_train_epoch_start(trainer, *args)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not step_based(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        n, bar = trainer.global_step, self.train_progress_bar
        if bar is not None and self._should_update(n, bar.total):
            _update_n(bar, n)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer, pl_module):
        if not step_based(trainer):
            return super().on_train_epoch_end(trainer, pl_module)
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the run directory's version, not a metric
        if step_based(trainer):
            metrics = {"epoch": trainer.current_epoch, **metrics}
        return metrics


def part_counts(module: nn.Module, depth: int = 2) -> list[tuple[str, int, int]]:
    """``(name, trainable, frozen)`` parameter counts for the parts of ``module``.

    Parts are its children and, down to ``depth`` levels, their children, in the order the model
    registers them; parts without parameters are left out. Each parameter is counted once, in the first
    part that holds it (a tied table is not counted again in the LM head), so the rows of one level add up
    to the whole model. The last row is ``total``.
    """
    rows: dict[str, list[int]] = {}
    total = [0, 0]
    for name, p in module.named_parameters():  # shared parameters once, under their first name
        col = 0 if p.requires_grad else 1
        total[col] += p.numel()
        parts = name.split(".")[:-1] or [name]  # the modules holding it (a root parameter: itself)
        for level in range(1, min(depth, len(parts)) + 1):
            rows.setdefault(".".join(parts[:level]), [0, 0])[col] += p.numel()
    return [*((name, t, f) for name, (t, f) in rows.items()), ("total", *total)]


class PartSummary(Callback):
    """Parameters per part of the model, trainable and frozen, printed once when fitting starts
    (in place of Lightning's ``ModelSummary``).

    Args:
        max_depth: how many levels of sub-modules get a row (0: print nothing).
    """

    def __init__(self, max_depth: int = 2):
        self.max_depth = max_depth

    def on_fit_start(self, trainer, pl_module):
        if self.max_depth and trainer.is_global_zero:
            rank_zero_info(format_parts(part_counts(pl_module, self.max_depth)))


def format_parts(rows: list[tuple[str, int, int]]) -> str:
    width = max(len(name) + 2 * name.count(".") for name, _, _ in rows)
    lines = [f"{'part':<{width}}  {'trainable':>9}  {'frozen':>9}"]
    for name, t, f in rows:
        label = "  " * name.count(".") + name.rsplit(".", 1)[-1] if name != "total" else name
        lines.append(f"{label:<{width}}  {get_human_readable_count(t):>9}  {get_human_readable_count(f):>9}")
    return "\n".join(lines)
