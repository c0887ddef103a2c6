"""Callbacks every Kelix run gets: data health and throughput in TensorBoard."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info


class DataHealth(pl.Callback):
    """Log the data stream's counts (samples read, skipped per reason, per source) to TensorBoard.

    Each batch carries its worker's running totals (``batch["data_stats"]``); the totals of every
    worker seen so far are summed per rank, then over ranks in one gather: ranks see different
    reasons and sources in different orders, so a per-key all-reduce would pair up the wrong
    counters (or wait forever for a key another rank never logs).
    """

    ALWAYS = ("skipped/corrupt_image", "skipped/bad_json", "skipped/missing_image", "skipped/unreadable_shard")

    def __init__(self):
        self.totals: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        stats = batch.get("data_stats") if isinstance(batch, dict) else None
        if not stats:
            return
        stats = dict(stats)
        self.totals[int(stats.pop("consumer", 0))] = stats
        if trainer.global_step % max(1, trainer.log_every_n_steps) != 0:
            return
        summed: dict[str, float] = dict.fromkeys(self.ALWAYS, 0.0)
        for s in self.totals.values():
            for k, v in s.items():
                summed[k] = summed.get(k, 0) + v
        for k, v in sorted(_sum_over_ranks(summed).items()):
            pl_module.log(f"data/{k}", float(v), on_step=True, on_epoch=False, sync_dist=False)

    def on_train_end(self, trainer, pl_module):
        """One summary line of what the training stream read and skipped (every rank joins the sum)."""
        summed: dict[str, float] = {}
        for s in self.totals.values():
            for k, v in s.items():
                summed[k] = summed.get(k, 0) + v
        summed = _sum_over_ranks(summed)
        skipped = {k.split("/", 1)[1]: int(v) for k, v in sorted(summed.items()) if k.startswith("skipped/") and v}
        if summed:
            rank_zero_info(f"data: {int(summed.get('samples', 0))} training samples read; skipped: "
                           + (", ".join(f"{k} {v}" for k, v in skipped.items()) or "none"))


def _sum_over_ranks(counts: dict[str, float]) -> dict[str, float]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return counts
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, counts)
    out: dict[str, float] = {}
    for c in gathered:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


class Throughput(pl.Callback):
    """Log step time, samples/s and tokens/s (when the batch reports ``num_tokens``) per device.

    Averaged over the batches since the last logging step (data loading included) and measured with
    one CUDA synchronisation per logging step, not per batch, so it does not slow the loop it measures.
    """

    def __init__(self):
        self._t = None

    def _reset(self):
        self._t, self._batches, self._samples, self._tokens = time.perf_counter(), 0, 0, 0.0

    def on_train_start(self, trainer, pl_module):
        self._reset()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._t is None:
            self._reset()
        self._batches += 1
        self._samples += pl_module.batch_size_of(batch) if hasattr(pl_module, "batch_size_of") else 0
        tokens = batch.get("num_tokens") if isinstance(batch, dict) else None
        has_tokens = tokens is not None
        if has_tokens:
            self._tokens += float(tokens.sum()) if torch.is_tensor(tokens) else float(tokens)
        if trainer.global_step % max(1, trainer.log_every_n_steps) != 0:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = (time.perf_counter() - self._t) / self._batches
        logs = {"perf/step_time_s": dt, "perf/samples_per_s": self._samples / self._batches / dt}
        if has_tokens:
            logs["perf/tokens_per_s"] = self._tokens / self._batches / dt
        if torch.cuda.is_available():
            logs["perf/max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        pl_module.log_dict(logs, on_step=True, on_epoch=False)
        self._reset()
