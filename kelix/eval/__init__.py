"""Benchmarks: readers of each benchmark's published files, its prompt and its scorer, by name.

    from kelix.eval import get_benchmark
    bench = get_benchmark("textvqa")
    items = bench.read("TextVQA_0.5.1_val.json", images="train_images/")
    bench.score_item(items[0], "two")  # -> {"acc": ...}

``kelix eval run|score|list`` (kelix.eval.cli) drives them; docs/eval.md lists each one's files, prompt
and metric. Importing this package is cheap: a benchmark's module is imported when it is asked for.
"""

from __future__ import annotations

from kelix.eval.base import BENCHMARKS, Benchmark, DataError, Item, get_benchmark, register

__all__ = ["BENCHMARKS", "Benchmark", "DataError", "Item", "get_benchmark", "register"]
