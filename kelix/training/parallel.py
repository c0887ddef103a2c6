"""FSDP2 and activation checkpointing, applied to a model's blocks from outside the model code."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _replace_children(root: nn.Module, targets: Iterable[nn.Module], wrap) -> int:
    ids = {id(m) for m in targets}
    n = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in ids:
                setattr(parent, name, wrap(child))
                n += 1
    return n


def apply_activation_checkpointing(root: nn.Module, blocks: list[nn.Module]) -> int:
    """Wrap each block so its activations are recomputed in backward (non-reentrant)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    return _replace_children(root, blocks, checkpoint_wrapper)


def apply_fsdp2(
    roots: list[nn.Module],
    blocks: list[nn.Module],
    mesh,
    param_dtype: str | None = None,
    reshard_after_forward: bool = True,
) -> None:
    """``fully_shard`` each block (one all-gather per block), then each root for what remains."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtype = DTYPES[param_dtype] if param_dtype else None
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for root in roots:
        # roots run first and last; keeping them gathered saves one all-gather per step
        fully_shard(root, mesh=mesh, mp_policy=mp, reshard_after_forward=False)


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` defaulting to pure data parallelism: FSDP2 across all ranks.

    Lightning's default splits each node's devices into a tensor-parallel group; Kelix shards with
    FSDP2 only, so ``data_parallel_size`` defaults to the world size and tensor parallelism to 1.
    """

    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: str | None = None, **kwargs):
        kwargs.setdefault("data_parallel_size", "auto")
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes // max(1, int(self._tensor_parallel_size))
        super().setup_environment()
