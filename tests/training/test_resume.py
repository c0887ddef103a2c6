"""Per-rank resume state: random generators round-trip through a weights_only checkpoint."""

import io
import random

import numpy as np
import pytest
import torch

from kelix.training.resume import collect_rng_state, gather_to_rank0, pick_rank_state, set_rng_state


class Owner:
    def __init__(self):
        self._gen = torch.Generator().manual_seed(7)


def draws(owner):
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)],
            torch.rand(3, generator=owner._gen).tolist())


def test_rng_state_round_trips_through_a_weights_only_checkpoint():
    owner = Owner()
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    draws(owner)
    buf = io.BytesIO()
    torch.save({"rng": gather_to_rank0(collect_rng_state(owner))}, buf)
    want = draws(owner)
    buf.seek(0)
    saved = pick_rank_state(torch.load(buf, weights_only=True)["rng"], "rng", strict=True)
    fresh = Owner()
    fresh._gen = None  # created lazily by a module: restored anyway
    set_rng_state(saved, owner=fresh)
    assert draws(fresh) == want


def test_rank_state_of_another_world_size():
    assert pick_rank_state([{"a": 1}], "x", strict=True) == {"a": 1}
    assert pick_rank_state(None, "x", strict=True) is None
    assert pick_rank_state([1, 2], "x", strict=False) is None
    with pytest.raises(ValueError, match="x was saved by 2 process\\(es\\) but is resumed by 1"):
        pick_rank_state([1, 2], "x", strict=True)


def test_each_rank_restores_its_own_rng_state(monkeypatch):
    # rank 1 of 2 loading a checkpoint whose rank-0 and rank-1 generators differ (the DiT seeds one per rank)
    from kelix.training import resume
    from kelix.training.module import KelixModule

    states = []
    for rank in range(2):
        owner = Owner()
        owner._gen.manual_seed(100 + rank)
        states.append(collect_rng_state(owner))
    monkeypatch.setattr(resume, "_dist_world", lambda: (1, 2))
    module = KelixModule()
    module.on_load_checkpoint({"kelix": {"skipped_steps": 3, "rng": states}})
    set_rng_state(module._pending_rng, owner=module)
    assert torch.equal(torch.rand(4, generator=module._gen), torch.rand(4, generator=torch.Generator().manual_seed(101)))
    assert module.skipped_steps == 3
