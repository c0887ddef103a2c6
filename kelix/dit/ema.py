"""Exponential moving average of the DiT's weights, correct under FSDP2.

The EMA is a second copy of the network (``requires_grad=False``) sharded exactly like the live one,
so each rank updates only its own shard, without communication: ``ema = decay * ema + (1 - decay) * p``
on the local tensors of matching parameters. Being a registered module, it is saved and restored with
the model's state dict (sharded checkpoints included), and sampling runs it like any module.
"""

import torch
from torch import nn


def decay_at(step: int, decay: float, warmup: bool = True) -> float:
    """EMA decay after ``step`` optimizer steps: ``min(decay, (1 + step) / (10 + step))`` with warmup.

    The warmup lets the average follow the fast early changes instead of staying near the initial weights.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema decay must be in [0, 1], got {decay}")
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def _local(t: torch.Tensor) -> torch.Tensor:
    """The rank's own shard of a DTensor (FSDP2 parameter), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def reshard(module: nn.Module) -> None:
    """Free the gathered parameters of FSDP2 modules (a forward without backward leaves roots gathered)."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@torch.no_grad()
def ema_update_(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """In place: ``ema_param = decay * ema_param + (1 - decay) * param`` for every parameter; buffers copied."""
    reshard(ema)
    reshard(model)
    mine, theirs = list(ema.named_parameters()), list(model.named_parameters())
    if [n for n, _ in mine] != [n for n, _ in theirs]:
        raise ValueError("the EMA and the model have different parameters (was the EMA copied from this model?)")
    e = [_local(p) for _, p in mine]
    m = [_local(p).to(t.dtype) for (_, p), t in zip(theirs, e)]
    for (name, _), a, b in zip(mine, e, m):
        if a.shape != b.shape:
            raise ValueError(f"EMA parameter {name}: shard {tuple(a.shape)} vs model {tuple(b.shape)}")
    # lerp: e + (1 - decay) * (m - e) == decay * e + (1 - decay) * m
    torch._foreach_lerp_(e, m, 1.0 - decay)
    for a, b in zip(ema.buffers(), model.buffers()):
        _local(a).copy_(_local(b))
