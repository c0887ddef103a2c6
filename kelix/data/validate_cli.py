"""``kelix validate-shards``: read shards through the schema and report every bad sample."""

from __future__ import annotations

import argparse
import logging

from kelix.data.shards import Source
from kelix.data.stream import ShardStream


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kelix validate-shards", description=__doc__)
    p.add_argument("shards", nargs="+", help="shard patterns (braces and globs accepted)")
    p.add_argument("--quiet", action="store_true", help="print the summary only")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR if a.quiet else logging.WARNING, format="%(message)s")
    stream = ShardStream([Source(a.shards)], shuffle_buffer=1, shuffle_shards=False, repeat=False)
    tasks: dict[str, int] = {}
    for sample in stream:
        tasks[sample.task] = tasks.get(sample.task, 0) + 1
    skipped = {k.split("/", 1)[1]: v for k, v in stream.stats.items() if k.startswith("skipped/")}
    print(f"{stream.stats['samples']} valid sample(s) in {len(stream.sources[0].urls)} shard(s): "
          + ", ".join(f"{k}={v}" for k, v in sorted(tasks.items())))
    if skipped:
        print("skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())))
    return 1 if skipped else 0
