"""``kelix data validate`` (alias ``kelix validate-shards``): read shards through the schema (every
image decoded, every manifest count checked) and report every bad sample, with counts per task and
per source (the ``source`` a converter stored, else the shard's folder)."""

from __future__ import annotations

import argparse
import logging
import os

from kelix.data.shards import Source
from kelix.data.stream import ShardStream


def source_of(sample) -> str:
    """``captions.csv`` for a sample a converter stored as ``captions.csv:17``; else the shard's folder."""
    src = sample.meta.get("source") if isinstance(sample.meta, dict) else None
    if isinstance(src, str) and ":" in src:
        return src.rsplit(":", 1)[0]
    return os.path.dirname(sample.shard) or "."


def main(argv: list[str] | None = None, prog: str = "kelix validate-shards") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__)
    p.add_argument("shards", nargs="+", help="shard patterns (braces and globs accepted)")
    p.add_argument("--quiet", action="store_true", help="print the summary only")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR if a.quiet else logging.WARNING, format="%(message)s")
    try:
        stream = ShardStream([Source(a.shards)], shuffle_buffer=1, shuffle_shards=False, repeat=False)
    except (FileNotFoundError, ValueError) as e:
        print(f"{prog}: {e}")
        return 2
    tasks: dict[str, int] = {}
    sources: dict[str, int] = {}
    for sample in stream:
        tasks[sample.task] = tasks.get(sample.task, 0) + 1
        src = source_of(sample)
        sources[src] = sources.get(src, 0) + 1
    skipped = {k.split("/", 1)[1]: v for k, v in stream.stats.items() if k.startswith("skipped/")}
    print(f"{stream.stats['samples']} valid sample(s) in {len(stream.sources[0].urls)} shard(s): "
          + ", ".join(f"{k}={v}" for k, v in sorted(tasks.items())))
    if len(sources) > 1 or not a.quiet:
        print("per source: " + ", ".join(f"{k}={v}" for k, v in sorted(sources.items())))
    if skipped:
        print("skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())))
    return 1 if skipped else 0
