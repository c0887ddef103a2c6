"""``kelix make-synthetic``: write synthetic shards of every task type."""

from __future__ import annotations

import argparse

from kelix.data.synthetic import TASKS, SyntheticData


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kelix make-synthetic", description=__doc__)
    p.add_argument("--out", default="data/synthetic", help="output directory (default: %(default)s)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="task types (default: all)")
    p.add_argument("--shards-per-task", type=int, default=2)
    p.add_argument("--samples-per-shard", type=int, default=64)
    p.add_argument("--min-size", type=int, default=64, help="smallest image side in pixels")
    p.add_argument("--max-size", type=int, default=160, help="largest image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--benchmarks", type=int, default=0, metavar="N",
                   help="also write the held-out synthetic-vqa/-ocr/-t2i benchmarks, N items each, "
                        "under OUT/benchmarks (their own seed; see kelix.eval.synthetic)")
    a = p.parse_args(argv)
    if a.benchmarks:
        import os

        from kelix.eval.synthetic import write_benchmarks

        for path in write_benchmarks(os.path.join(a.out, "benchmarks"), a.benchmarks):
            print(f"benchmark: {path}")
    data = SyntheticData(a.out, a.tasks, a.shards_per_task, a.samples_per_shard, (a.min_size, a.max_size), a.seed)
    paths = data.ensure()
    print(f"{len(paths)} shard(s) in {a.out}: {', '.join(sorted(set(t for t in a.tasks)))}")
    return 0
