"""FSDP2 and activation checkpointing, applied to a model's blocks from outside the model code."""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def apply_activation_checkpointing(root: nn.Module, blocks: list[nn.Module]) -> int:
    """Recompute each block's activations in backward (non-reentrant); nothing is renamed.

    Hugging Face decoder layers (``GradientCheckpointingLayer``) use their own switch, which also
    drops the KV cache HF builds by default (a recomputed layer would append its keys and values to
    it a second time) and keeps FSDP2's hooks outside the recomputation. Other blocks (timm,
    diffusers, the kit's own) get PyTorch's composable ``checkpoint``. Parameter names, state
    dicts, optimizer groups and consolidated checkpoints keep the model's own names, and the
    blocks stay the same objects (FSDP2's ``fully_shard`` composes with both). A block must not
    mutate state in forward (a cache, a counter): it runs twice. Returns the blocks newly set up.
    """
    from functools import partial

    from torch.distributed._composable import checkpoint
    from torch.utils.checkpoint import checkpoint as checkpoint_fn

    inside = {id(m) for m in root.modules()}
    foreign = [b for b in blocks if id(b) not in inside]
    if foreign:
        raise ValueError(f"activation checkpointing: {len(foreign)} of {len(blocks)} parallel_blocks() are not "
                         "submodules of the LightningModule")
    n = 0
    for block in blocks:
        if is_checkpointed(block):
            continue
        if _is_hf_layer(block):
            block._gradient_checkpointing_func = partial(checkpoint_fn, use_reentrant=False)
            block.gradient_checkpointing = True
        else:
            checkpoint(block)
        n += 1
    return n


def _is_hf_layer(module: nn.Module) -> bool:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # an older transformers
        return False
    return isinstance(module, GradientCheckpointingLayer)


def is_checkpointed(module: nn.Module) -> bool:
    from torch.distributed._composable import checkpoint

    if _is_hf_layer(module):
        return bool(module.gradient_checkpointing)
    return checkpoint.state(module) is not None


def apply_fsdp2(
    roots: list[nn.Module],
    blocks: list[nn.Module],
    mesh,
    param_dtype: str | None = None,
    reshard_after_forward: bool = True,
    owner: nn.Module | None = None,
) -> None:
    """``fully_shard`` each block (one all-gather per block), then each root for what remains.

    With ``owner`` (the LightningModule), every parameter it holds must end up sharded: a
    parameter left out would silently stay unsynchronised across ranks, so it is an error that
    names the parameter. A block or root with an ``fsdp_param_dtype`` attribute (e.g. the
    tokenizer's quantizer, ``"float32"``) is gathered in that dtype instead of ``param_dtype``.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    def policy(module: nn.Module) -> MixedPrecisionPolicy:
        name = getattr(module, "fsdp_param_dtype", None) or param_dtype
        dtype = DTYPES[name] if name else None
        return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)

    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy(block), reshard_after_forward=reshard_after_forward)
    for root in roots:
        # roots run first and last; keeping them gathered saves one all-gather per step
        fully_shard(root, mesh=mesh, mp_policy=policy(root), reshard_after_forward=False)
    if owner is not None:
        loose = [n for n, p in owner.named_parameters() if not isinstance(p, DTensor)]
        if loose:
            raise ValueError(f"FSDP2: {len(loose)} parameter(s) are in no parallel_blocks()/parallel_roots() module, "
                             f"e.g. {loose[0]!r}: return their module from parallel_roots()")


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` for pure data parallelism: FSDP2 across all ranks.

    Lightning's default splits each node's devices into a tensor-parallel group; Kelix shards with
    FSDP2 only, so the data-parallel size is the world size (``num_nodes * devices``). The model is
    sharded in :meth:`kelix.training.module.KelixModule.configure_model`.

    Args:
        data_parallel_size: ranks that shard the model (``auto``: the world size).
        tensor_parallel_size: must stay 1 (``auto`` means 1): Kelix has no tensor-parallel plan.
        save_distributed_checkpoint: ``True`` saves a sharded checkpoint, a directory with one file
            per rank (fast, any size; ``kelix convert-checkpoint`` turns it into an HF-style
            directory); ``False`` gathers full weights and optimizer state on rank 0 into one file.
        process_group_backend: ``nccl`` / ``gloo`` (default: by device).
        timeout: collective timeout.
    """

    def __init__(
        self,
        data_parallel_size: int | Literal["auto"] = "auto",
        tensor_parallel_size: int | Literal["auto"] = 1,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ):
        if tensor_parallel_size not in (1, "auto"):
            raise ValueError(f"FSDP2Strategy: tensor_parallel_size must be 1, got {tensor_parallel_size!r}")
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def _register() -> None:
    """``strategy: fsdp2`` (or ``--trainer.strategy fsdp2``) names :class:`FSDP2Strategy` with its defaults."""
    from lightning.pytorch.strategies import StrategyRegistry

    if "fsdp2" not in StrategyRegistry:
        StrategyRegistry.register("fsdp2", FSDP2Strategy, description="FSDP2 (fully_shard per block) over all ranks")


_register()
