"""Timing helpers shared by the benchmarks (CUDA-synchronised wall clock, JSON output)."""

from __future__ import annotations

import json
import platform
import time

import torch


def device_info() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def timeit(fn, warmup: int = 2, repeat: int = 5) -> float:
    """Median seconds per call of ``fn`` (synchronising CUDA around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def time_train_step(loss_fn, optimizer, repeat: int = 5) -> float:
    """Median seconds of forward (``loss_fn()``), backward and optimizer step; peak memory is reset first."""

    def step():
        loss_fn().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return timeit(step, warmup=2, repeat=repeat)


def report(name: str, **results) -> dict:
    out = {"benchmark": name, **results, "env": device_info()}
    print(json.dumps(out))
    return out
