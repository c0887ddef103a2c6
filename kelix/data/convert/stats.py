"""``kelix data stats``: what a set of shards holds, to choose ``max_blocks`` and mixture weights.

Samples per task, images per sample, image-size (longer side) and text-length (characters)
histograms, and, with ``--text-tokenizer``, the number of blocks each sample lays out to: exactly what
the LLM processor (:class:`kelix.llm.data.LLMProcessor`) builds for it with the given image sizing
(understanding images at native resolution, generation targets at ``--gen-size``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections import Counter

from kelix.data.shards import Source
from kelix.data.stream import ShardStream


def pow2_bin(x: int) -> str:
    """``"64-127"``: the power-of-two bucket of ``x`` (``"0"`` for 0)."""
    if x <= 0:
        return "0"
    lo = 2 ** int(math.log2(x))
    return f"{lo}-{2 * lo - 1}"


def _sorted_bins(counter: Counter) -> dict:
    return {k: counter[k] for k in sorted(counter, key=lambda b: int(b.split("-")[0]))}


def percentiles(values: list[int], qs=(50, 90, 99, 100)) -> dict:
    if not values:
        return {}
    v = sorted(values)
    return {f"p{q}": v[min(len(v) - 1, math.ceil(q / 100 * len(v)) - 1)] for q in qs}


def collect(stream, processor=None, limit: int | None = None) -> dict:
    tasks, n_images, sizes, lengths, blocks, unlaid = Counter(), Counter(), Counter(), Counter(), [], Counter()
    blocks_by_task: dict[str, list[int]] = {}
    from kelix.data.schema import SampleError

    n = 0
    for sample in stream:
        tasks[sample.task] += 1
        n_images[str(len(sample.images))] += 1
        for im in sample.images:
            if im.pixels is not None:
                sizes[pow2_bin(max(im.pixels.size))] += 1
        lengths[pow2_bin(sum(len(t.text) for t in sample.turns))] += 1
        if processor is not None:
            try:
                b = len(processor(sample))
                blocks.append(b)
                blocks_by_task.setdefault(sample.task, []).append(b)
            except SampleError as e:
                unlaid[e.reason] += 1
        n += 1
        if limit and n >= limit:
            break
    out = {"samples": n, "tasks": dict(sorted(tasks.items())), "images_per_sample": _sorted_bins(n_images),
           "image_longer_side": _sorted_bins(sizes), "text_chars": _sorted_bins(lengths),
           "skipped": {k.split("/", 1)[1]: v for k, v in stream.stats.items() if k.startswith("skipped/")}}
    if processor is not None:
        out["blocks"] = {"all": percentiles(blocks), **{t: percentiles(v) for t, v in sorted(blocks_by_task.items())},
                         "histogram": _sorted_bins(Counter(pow2_bin(b) for b in blocks))}
        if unlaid:
            out["blocks"]["not_laid_out"] = dict(unlaid)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kelix data stats", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", nargs="+", help="shard patterns (braces and globs accepted)")
    p.add_argument("--text-tokenizer", help="tokenizer folder (or builtin:bytes): also count blocks per sample")
    p.add_argument("--patch-size", type=int, default=14)
    p.add_argument("--merge-size", type=int, default=2)
    p.add_argument("--min-pixels", type=int, default=56 * 56)
    p.add_argument("--max-pixels", type=int, default=28 * 28 * 1280)
    p.add_argument("--gen-size", type=int, default=504, help="generation targets' side (paper 4.3.3)")
    p.add_argument("--limit", type=int, help="look at the first N samples only")
    p.add_argument("--json", help="also write the statistics to this file")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(message)s")
    processor = None
    try:
        if a.text_tokenizer:
            from kelix.data.images import ImageConfig
            from kelix.llm.data import GEN_IMAGE, LLMProcessor

            img = ImageConfig(patch_size=a.patch_size, merge_size=a.merge_size, min_pixels=a.min_pixels,
                              max_pixels=a.max_pixels)
            gen = ImageConfig(patch_size=a.patch_size, merge_size=a.merge_size, fixed_size=a.gen_size,
                              aspect_range=GEN_IMAGE.aspect_range)
            processor = LLMProcessor(a.text_tokenizer, N=1, K=1, image=img, gen_image=gen, use_codes=False,
                                     max_blocks=2**62, prompt_dropout=0.0)
        stream = ShardStream([Source(a.shards)], shuffle_buffer=1, shuffle_shards=False, repeat=False)
        out = collect(stream, processor, a.limit)
    except (FileNotFoundError, ValueError) as e:
        print(f"kelix data stats: {e}")
        return 2
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    print(f"{out['samples']} sample(s); tasks: " + ", ".join(f"{k}={v}" for k, v in out["tasks"].items()))
    for name in ("images_per_sample", "image_longer_side", "text_chars"):
        print(f"{name}: " + ", ".join(f"{k}: {v}" for k, v in out[name].items()))
    if "blocks" in out:
        b = out["blocks"]
        print("blocks per sample: " + ", ".join(f"{k}={v}" for k, v in b["all"].items())
              + "  (choose max_blocks >= p99; longer samples are skipped as too_long)")
        for t in out["tasks"]:
            if t in b:
                print(f"  {t}: " + ", ".join(f"{k}={v}" for k, v in b[t].items()))
        print("blocks histogram: " + ", ".join(f"{k}: {v}" for k, v in b["histogram"].items()))
    if out["skipped"]:
        print("skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(out["skipped"].items())))
    return 0
