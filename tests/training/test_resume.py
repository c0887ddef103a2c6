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
