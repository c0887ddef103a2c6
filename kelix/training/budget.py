"""Data budgets in the paper's units (Table 5: samples and tokens): count them, log them, stop at them."""

from __future__ import annotations

import lightning.pytorch as pl
import torch


class DataBudget(pl.Callback):
    """Count the training samples and tokens every rank consumed; stop the run at a budget.

    A *token* is what the batch reports as ``num_tokens``: for the unified LLM, real (non-padding)
    LLM positions, one per block (a text token, or a visual block of N codes; see
    :func:`kelix.llm.data.collate_docs`); for the tokenizer, its text tokens. A DiT batch has none.
    Samples are ``batch_size`` (documents, before packing).

    Totals are summed over ranks at each logging step (one all-reduce of two numbers, no per-step
    sync), logged as ``data/tokens`` (``data/samples`` is :class:`~kelix.training.callbacks.DataHealth`'s,
    the same count) and compared with the budget there: the run stops at the first logging step
    past it (at most ``log_every_n_steps`` optimizer steps late), on every rank at once. The totals are
    saved in checkpoints, so a resumed run keeps counting.

    Args:
        max_samples: stop once this many training samples were consumed (None: no limit).
        max_tokens: stop once this many tokens were consumed (None: no limit).
    """

    def __init__(self, max_samples: int | None = None, max_tokens: int | None = None):
        for name, v in (("max_samples", max_samples), ("max_tokens", max_tokens)):
            if v is not None and v <= 0:
                raise ValueError(f"budget.{name} must be positive, got {v}")
        self.max_samples, self.max_tokens = max_samples, max_tokens
        self.samples = self.tokens = 0  # totals over ranks, as of the last logging step
        self._samples = self._tokens = 0  # this rank's, since then
        self._seen_tokens = False
        self._checked = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not isinstance(batch, dict):
            return
        self._samples += pl_module.batch_size_of(batch) if hasattr(pl_module, "batch_size_of") else 0
        n = batch.get("num_tokens")
        if n is not None:
            self._seen_tokens = True
            self._tokens += int(n.sum()) if torch.is_tensor(n) else int(n)
        step = trainer.global_step
        if step == self._checked or step % max(1, trainer.log_every_n_steps) != 0:
            return
        self._checked = step
        counts = torch.tensor([self._samples, self._tokens, int(self._seen_tokens)], dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            counts = counts.to(pl_module.device)
            torch.distributed.all_reduce(counts)
        s, t, seen = (int(v) for v in counts.tolist())
        self.samples, self.tokens = self.samples + s, self.tokens + t
        self._samples = self._tokens = 0
        if seen:
            pl_module.log("data/tokens", float(self.tokens), on_step=True, on_epoch=False, sync_dist=False)
        if self.reached() and not trainer.should_stop:
            trainer.should_stop = True
            from lightning.pytorch.utilities import rank_zero_info

            rank_zero_info(f"data budget reached at step {step}: {self.samples:,} samples, {self.tokens:,} tokens")

    def reached(self) -> bool:
        return ((self.max_samples is not None and self.samples >= self.max_samples)
                or (self.max_tokens is not None and self.tokens >= self.max_tokens))

    def state_dict(self) -> dict:
        return {"samples": self.samples + self._samples, "tokens": self.tokens + self._tokens}

    def load_state_dict(self, state_dict: dict) -> None:
        self.samples, self.tokens = int(state_dict.get("samples", 0)), int(state_dict.get("tokens", 0))
        self._samples = self._tokens = 0
