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


PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core peaks Lightning may not name


def peak_flops(device: torch.device, dtype) -> float | None:
    """The device's theoretical peak FLOP/s at ``dtype`` (Lightning's table, then a few common names)."""
    from lightning.fabric.utilities.throughput import get_available_flops

    if device.type != "cuda":
        return None
    peak = get_available_flops(device, dtype)
    if peak is None and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    return peak


def batch_flops(pl_module, batch):
    """Training FLOPs of ``batch`` (a device tensor or number; None when unknown): the module's
    ``flops_per_batch(batch)``, else the unified LLM's :meth:`~kelix.llm.model.KelixLM.train_flops`."""
    if hasattr(pl_module, "flops_per_batch"):
        return pl_module.flops_per_batch(batch)
    lm = getattr(pl_module, "lm", None)
    if not (hasattr(lm, "train_flops") and isinstance(batch, dict) and "position_ids" in batch):
        return None
    from kelix.llm.attention import square_sum

    pos = batch["position_ids"]
    tokens = batch.get("tokens")
    return lm.train_flops(pos.shape[0], pos.shape[1], square_sum(pos), (tokens < 0).sum() if tokens is not None else None)


class Throughput(pl.Callback):
    """Log step time, samples/s, tokens/s (when the batch reports ``num_tokens``) and, where the
    model's FLOPs and the device's peak are known, ``perf/tflops_per_s`` and ``perf/mfu`` per device.

    Averaged over the batches since the last logging step (data loading included) and measured with
    one CUDA synchronisation per logging step, not per batch (counts stay on the device until then),
    so it does not slow the loop it measures. MFU counts model FLOPs (:func:`batch_flops`) against
    the peak of the run's precision (bf16 for ``bf16-mixed``).
    """

    def __init__(self):
        self._t = None

    def _reset(self):
        self._t, self._batches, self._samples, self._tokens, self._flops = time.perf_counter(), 0, 0, None, None

    def on_train_start(self, trainer, pl_module):
        self._reset()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._t is None:
            self._reset()
        self._batches += 1
        self._samples += pl_module.batch_size_of(batch) if hasattr(pl_module, "batch_size_of") else 0
        tokens = batch.get("num_tokens") if isinstance(batch, dict) else None
        if tokens is not None:
            tokens = tokens.sum() if torch.is_tensor(tokens) else tokens
            self._tokens = tokens if self._tokens is None else self._tokens + tokens
        flops = batch_flops(pl_module, batch)
        if flops is not None:
            self._flops = flops if self._flops is None else self._flops + flops
        if trainer.global_step % max(1, trainer.log_every_n_steps) != 0:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = (time.perf_counter() - self._t) / self._batches
        logs = {"perf/step_time_s": dt, "perf/samples_per_s": self._samples / self._batches / dt}
        if self._tokens is not None:
            logs["perf/tokens_per_s"] = float(self._tokens) / self._batches / dt
        if self._flops is not None:
            achieved = float(self._flops) / self._batches / dt
            logs["perf/tflops_per_s"] = achieved / 1e12
            precision = str(trainer.precision)
            dtype = torch.bfloat16 if "bf16" in precision else torch.float16 if "16" in precision else torch.float32
            peak = peak_flops(pl_module.device, dtype)
            if peak:
                logs["perf/mfu"] = achieved / peak
        if torch.cuda.is_available():
            logs["perf/max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        pl_module.log_dict(logs, on_step=True, on_epoch=False)
        self._reset()
