"""``KelixModule``: what the tokenizer, LLM and DiT LightningModules share.

A subclass implements :meth:`KelixModule.step` (a batch -> a dict of scalar tensors with ``loss``)
and, to train under FSDP2, :meth:`KelixModule.parallel_blocks`. The base class does the rest:
logging every term, the optimizer and schedule, gradient clipping with the norm logged,
non-finite loss handling, activation checkpointing and FSDP2 sharding in ``configure_model``.
"""

from __future__ import annotations

import logging
from typing import Literal

import lightning.pytorch as pl
import torch
from torch import nn

from kelix.data.processor import is_padding
from kelix.training.optim import OptimConfig, build_optimizer
from kelix.training.resume import collect_rng_state, gather_to_rank0, pick_rank_state, set_rng_state

log = logging.getLogger("kelix.training")


class NonFiniteLossError(RuntimeError):
    pass


class KelixModule(pl.LightningModule):
    """Base LightningModule of the kit.

    Args:
        optim: optimizer, per-group learning rates and schedule.
        nonfinite: what a NaN/inf loss does: ``skip`` the step (counted in ``train/skipped_steps``)
            or ``stop`` the run with an error naming the step.
        max_skipped_steps: with ``skip``, stop anyway after this many skipped steps in a row.
        activation_checkpointing: recompute each block of :meth:`parallel_blocks` in backward.
        fsdp_param_dtype: under FSDP2, the dtype parameters are gathered in for compute
            (``bfloat16`` for bf16 training; gradients are reduced in float32).
        fsdp_reshard_after_forward: free gathered parameters after forward (saves memory,
            costs one more all-gather in backward).
    """

    def __init__(
        self,
        optim: OptimConfig | None = None,
        nonfinite: Literal["skip", "stop"] = "skip",
        max_skipped_steps: int = 20,
        activation_checkpointing: bool = False,
        fsdp_param_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        fsdp_reshard_after_forward: bool = True,
    ):
        super().__init__()
        self.optim = optim or OptimConfig()
        self.nonfinite, self.max_skipped_steps = nonfinite, max_skipped_steps
        self.activation_checkpointing = activation_checkpointing
        self.fsdp_param_dtype, self.fsdp_reshard_after_forward = fsdp_param_dtype, fsdp_reshard_after_forward
        self.skipped_steps = 0
        self._skipped_in_a_row = 0
        self._skip_this_step = False
        self.padding_batch = False  # True while `step` runs on an evaluation padding batch
        self._pending_rng: dict | None = None
        self._parallelized = False

    # -- to implement
    def step(self, batch, split: str) -> dict[str, torch.Tensor]:
        """Compute the loss terms of one batch: a dict with ``loss`` plus any scalars to log."""
        raise NotImplementedError

    def parallel_blocks(self) -> list[nn.Module]:
        """Transformer blocks to shard with FSDP2 and to checkpoint (one unit each)."""
        return []

    def parallel_roots(self) -> list[nn.Module]:
        """Top-level networks sharded after their blocks (default: every child holding parameters)."""
        return [m for m in self.children() if any(True for _ in m.parameters())]

    def batch_size_of(self, batch) -> int:
        for key in ("batch_size",):
            if isinstance(batch, dict) and key in batch:
                return int(batch[key])
        for v in batch.values() if isinstance(batch, dict) else []:
            if torch.is_tensor(v) and v.ndim > 0:
                return v.shape[0]
        return 1

    # -- training loop
    def _finite_everywhere(self, loss: torch.Tensor) -> bool:
        ok = torch.isfinite(loss.detach()).all().float()
        if self.trainer is not None and self.trainer.world_size > 1:
            ok = self.trainer.strategy.reduce(ok, reduce_op="min")  # every rank must skip together
        return bool(ok > 0)

    def training_step(self, batch, batch_idx):
        if self._pending_rng is not None:  # restored here, where the uninterrupted run would be
            set_rng_state(self._pending_rng, owner=self)
            self._pending_rng = None
        self._unshard_roots()
        out = self.step(batch, "train")
        loss = out["loss"]
        if not self._finite_everywhere(loss):
            msg = f"non-finite loss at step {self.global_step} (batch {batch_idx}): " + ", ".join(
                f"{k}={v.item():.4g}" for k, v in out.items() if torch.is_tensor(v) and v.numel() == 1)
            if self.nonfinite == "stop":
                raise NonFiniteLossError(msg + " (set model.init_args.nonfinite: skip to skip such steps)")
            log.warning("%s: the optimizer step is skipped", msg)
            self._skip_this_step = True
            # Backward still runs (on garbage) so every rank and DDP/FSDP2 see the same collectives;
            # on_before_optimizer_step then drops the gradients of the whole accumulation window.
            return loss
        self._log_terms(out, "train", batch)
        return loss

    def on_before_optimizer_step(self, optimizer):
        if self._skip_this_step:
            self._skip_this_step = False
            optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without gradients untouched
            self.skipped_steps += 1
            self._skipped_in_a_row += 1
            if self._skipped_in_a_row > self.max_skipped_steps:
                raise NonFiniteLossError(f"{self._skipped_in_a_row} non-finite steps in a row (at step "
                                         f"{self.global_step}); max_skipped_steps is {self.max_skipped_steps}")
        else:
            self._skipped_in_a_row = 0
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)

    def validation_step(self, batch, batch_idx):
        return self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        return self._eval_step(batch, "test")

    def _eval_step(self, batch, split: str):
        # A padding batch (this rank ran out while another still has batches; see ShardDataModule)
        # runs for FSDP2's collectives and logs the same keys with weight 0: the epoch means are
        # exactly those of the real batches. Metrics a subclass accumulates itself in `step`
        # should skip it too: `self.padding_batch` is True while it runs.
        self._unshard_roots()
        self.padding_batch = is_padding(batch)
        try:
            out = self.step(batch, split)
        finally:
            padding, self.padding_batch = self.padding_batch, False
        self._log_terms(out, split, batch, weight=0 if padding else None)
        return out["loss"]

    def _log_terms(self, out: dict, split: str, batch, weight: int | None = None):
        scalars = {f"{split}/{k}": v.detach().float() for k, v in out.items()
                   if torch.is_tensor(v) and v.numel() == 1}
        scalars[f"{split}_loss"] = out["loss"].detach().float()
        n = self.batch_size_of(batch) if weight is None else weight
        if n == 0:  # zeros, not the values: 0 * nan would still poison the mean
            scalars = {k: torch.zeros_like(v) for k, v in scalars.items()}
        train = split == "train"
        loss = scalars.pop(f"{split}_loss")
        self.log_dict(scalars, on_step=train, on_epoch=not train, sync_dist=not train, batch_size=n, prog_bar=False)
        self.log(f"{split}_loss", loss, prog_bar=True, on_step=train, on_epoch=not train, sync_dist=not train,
                 batch_size=n, logger=False)

    # -- optimizer
    def configure_optimizers(self):
        return build_optimizer(self, self.optim, int(self.trainer.estimated_stepping_batches))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip = gradient_clip_val or self.optim.grad_clip
        algorithm = str(getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm)
                        or self.optim.grad_clip_algorithm)
        if algorithm not in ("norm", "value"):
            raise ValueError(f"optim.grad_clip_algorithm {algorithm!r} is not norm or value")
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return
        # the logged norm is the one before clipping, whichever the algorithm
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip and algorithm == "norm" else float("inf"))
        if clip and algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, clip)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        self.log("train/grad_norm", norm.float(), on_step=True, on_epoch=False)

    # -- checkpoint bookkeeping (hooks run on every rank: per-rank RNG states are gathered to rank 0)
    def on_save_checkpoint(self, checkpoint):
        checkpoint["kelix"] = {"skipped_steps": self.skipped_steps, "rng": gather_to_rank0(collect_rng_state(self))}

    def on_load_checkpoint(self, checkpoint):
        saved = checkpoint.get("kelix", {})
        self.skipped_steps = saved.get("skipped_steps", 0)
        self._pending_rng = pick_rank_state(saved.get("rng"), "the random state", strict=False)
        if saved.get("rng") and self._pending_rng is None:
            log.warning("the number of processes changed since the checkpoint: random generators are not restored")

    # -- parallelism (math stays in the model files; this only wraps their blocks)
    def configure_model(self):
        if self._parallelized:
            return
        self._parallelized = True
        from kelix.training.parallel import apply_activation_checkpointing, apply_fsdp2

        if self.activation_checkpointing:
            apply_activation_checkpointing(self, self.parallel_blocks())
        mesh = self.device_mesh
        if mesh is not None:
            dp = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
            roots = self.parallel_roots()
            apply_fsdp2(roots, self.parallel_blocks(), dp, param_dtype=self.fsdp_param_dtype,
                        reshard_after_forward=self.fsdp_reshard_after_forward, owner=self)
            self.__dict__["_fsdp_roots"] = roots  # not submodules: a plain list outside nn.Module bookkeeping

    def _unshard_roots(self):
        """Gather the roots' parameters before ``step``: a step may call a root's submodule directly
        (``lm.get_input_embeddings()(ids)``), which bypasses the root's forward that would gather them.
        Roots stay gathered from forward to backward anyway, so this only moves the all-gather earlier."""
        for root in self.__dict__.get("_fsdp_roots", ()):
            root.unshard()
