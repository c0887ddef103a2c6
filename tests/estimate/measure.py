"""Peak memory of a training step on CPU, measured with the PyTorch profiler's allocation events."""

from __future__ import annotations

import itertools


def step_peak_bytes(step, tensors_alive) -> int:
    """Peak bytes while ``step()`` runs: the bytes of ``tensors_alive`` (parameters, optimizer state: allocated
    before) plus the highest running sum of the profiler's allocations and frees during the step."""
    from torch.profiler import ProfilerActivity, profile

    before = sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in tensors_alive}.values())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    return before + max(itertools.accumulate(b for _, b in events))
