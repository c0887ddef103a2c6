"""EMA: the update math, the warmup, and the sharded update under FSDP2 (2 CPU processes, gloo)."""

import os
import socket

import pytest
import torch
from torch import nn

from kelix.dit.ema import decay_at, ema_update_


def test_update_is_decay_times_ema_plus_one_minus_decay_times_param():
    model, ema = nn.Linear(3, 2), nn.Linear(3, 2)
    with torch.no_grad():
        for p, q in zip(model.parameters(), ema.parameters()):
            p.copy_(torch.arange(p.numel(), dtype=torch.float32).view_as(p))
            q.fill_(10.0)
    ema_update_(ema, model, 0.9)
    w = torch.arange(6, dtype=torch.float32).view(2, 3)
    assert torch.allclose(ema.weight, 0.9 * 10 + 0.1 * w)
    assert torch.allclose(ema.bias, 0.9 * 10 + 0.1 * torch.tensor([0.0, 1.0]))
    ema_update_(ema, model, 0.0)  # decay 0 copies
    assert torch.equal(ema.weight, model.weight)
    ema_update_(ema, nn.Linear(3, 2), 1.0)  # decay 1 keeps
    assert torch.equal(ema.weight, model.weight)


def test_warmup_decay():
    assert decay_at(0, 0.9999) == pytest.approx(0.1)
    assert decay_at(90, 0.9999) == pytest.approx(0.91)
    assert decay_at(10**7, 0.9999) == 0.9999
    assert decay_at(0, 0.9999, warmup=False) == 0.9999
    with pytest.raises(ValueError, match="decay must be in"):
        decay_at(0, 1.5)


def test_mismatched_models_are_refused():
    with pytest.raises(ValueError, match="different parameters"):
        ema_update_(nn.Linear(3, 2), nn.Sequential(nn.Linear(3, 2)), 0.9)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Net(nn.Module):
    """Blocks + a root-level layer, sharded the way DiTModule shards the DiT (no diffusers import in workers)."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(nn.Linear(6, 6) for _ in range(2))
        self.head = nn.Linear(6, 3)
        self.register_buffer("steps", torch.tensor([float(seed)]))

    def forward(self, x):
        for b in self.blocks:
            x = torch.tanh(b(x))
        return self.head(x)


def _sharded_worker(rank: int, world: int, port: int, out_dir: str):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from kelix.dit.ema import reshard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        live, ema = Net(0), Net(1)  # different weights, same structure
        ref_live, ref_ema = Net(0), Net(1)
        mesh = init_device_mesh("cpu", (world,))
        for net in (live, ema):  # as kelix.training.parallel.apply_fsdp2 (without importing lightning here)
            for block in net.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(net, mesh=mesh, reshard_after_forward=False)
        assert type(live.head.weight).__name__ == "DTensor"
        for step in range(3):
            with torch.no_grad():  # move the live weights, identically on both sides
                for p, q in zip(live.parameters(), ref_live.parameters()):
                    p.add_(0.01 * (step + 1))
                    q.add_(0.01 * (step + 1))
            ema(torch.randn(2, 6))  # a sampling forward (no backward) leaves the root gathered
            ema_update_(ema, live, 0.8)
            ema_update_(ref_ema, ref_live, 0.8)
        reshard(ema)
        full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in ema.state_dict().items()}
        diff = max((full[k] - v).abs().max().item() for k, v in ref_ema.state_dict().items())
        torch.save({"diff": diff, "n": len(full)}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sharded_ema_equals_the_unsharded_ema(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_sharded_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert res["n"] == 7 and res["diff"] < 1e-6
