"""A tiny causal LM with transformer blocks, a byte processor and a key recorder for the resume tests.

Imported by ``kelix fit`` subprocesses (``class_path: tests.distributed.toy.ToyLM``), so it stays light.
"""

from __future__ import annotations

import json
import os

import lightning.pytorch as pl
import torch

from kelix.data.processor import Processor
from kelix.hf import TINY_QWEN3, load_causal_lm
from kelix.training.module import KelixModule

SEQ = 24


class ByteProcessor(Processor):
    """The sample's text as byte ids (fixed length, padded with 0), keeping the key."""

    def __call__(self, sample):
        ids = list(sample.turns[0].text.encode())[:SEQ]
        return {"key": sample.key, "ids": torch.tensor(ids + [0] * (SEQ - len(ids)))}

    def collate(self, items):
        return {"keys": [i["key"] for i in items], "ids": torch.stack([i["ids"] for i in items])}


class ToyLM(KelixModule):
    """``TINY_QWEN3`` trained on byte ids; ``parallel_blocks()`` are its decoder layers.

    Args:
        nan_at_step: make the loss NaN at this global step (on ``nan_rank`` only; -1: every rank).
        nan_rank: which rank sees the NaN.
        nan_batches: also make the loss NaN at these micro-batch indices (counted over the run).
    """

    def __init__(self, nan_at_step: int | None = None, nan_rank: int = -1, nan_batches: list[int] | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        self.nan_batches = set(nan_batches or [])
        torch.manual_seed(0)  # identical initial weights on every rank and in every run
        self.lm = load_causal_lm(config=dict(TINY_QWEN3, num_hidden_layers=2))
        self.nan_at_step, self.nan_rank = nan_at_step, nan_rank
        self._gen: torch.Generator | None = None

    def step(self, batch, split):
        ids = batch["ids"]
        out = self.lm(input_ids=ids, labels=ids)
        loss = out.loss
        if self.nan_at_step is not None and self.global_step == self.nan_at_step and split == "train":
            if self.nan_rank < 0 or self.nan_rank == self.global_rank:
                loss = loss * float("nan")
        if split == "train" and self.trainer.fit_loop.total_batch_idx in self.nan_batches:
            loss = loss * float("inf")
        # a draw from the global RNG (the same on every rank) and one from a per-rank generator (as the
        # DiT's noise, timesteps and dropout), recorded with the keys: a resumed run must restore both,
        # each rank its own
        noise, own = torch.rand(()), torch.rand((), generator=self._rank_rng())
        if split == "train":
            self.last_noise = [float(noise), float(own)]
        return {"loss": loss, "noise": noise}

    def _rank_rng(self) -> torch.Generator:
        if self._gen is None:  # created lazily, like the DiT's: a resume restores it before the first step
            self._gen = torch.Generator().manual_seed(1234 + 1_000_003 * self.global_rank)
        return self._gen

    def parallel_blocks(self):
        return list(self.lm.model.layers)


class KeyRecorder(pl.Callback):
    """Append ``{"rank", "batch", "step", "keys", "noise"}`` per training batch to ``<dir>/keys.<rank>.jsonl``.

    ``batch`` counts batches over the whole run (epochs included), and is restored on resume;
    ``noise`` is the model's draws in that batch: ``[global RNG, this rank's own generator]``.
    """

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        os.makedirs(self.out_dir, exist_ok=True)
        rec = {"rank": trainer.global_rank, "batch": trainer.fit_loop.total_batch_idx, "step": trainer.global_step,
               "keys": batch["keys"], "noise": pl_module.last_noise}
        with open(os.path.join(self.out_dir, f"keys.{trainer.global_rank}.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")


class ToyLMWithLooseParameter(ToyLM):
    """A parameter held by the LightningModule itself, in no module FSDP2 shards (a mistake to catch)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.scale = torch.nn.Parameter(torch.ones(()))

    def parallel_roots(self):
        return [self.lm]
