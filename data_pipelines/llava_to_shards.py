"""Convert LLaVA-style conversation JSON (LLaVA, ShareGPT4V, M4-Instruct...) to kelix shards.

Kept for existing scripts: this is ``kelix data convert --format llava`` (see docs/data.md), with the
same resumable, manifest-writing job; ``--max-count`` is its ``--shard-size`` (source records per shard).

    python -m data_pipelines.llava_to_shards --json llava.json --images /data/coco --out shards/llava
"""

from __future__ import annotations

import argparse
import json
import sys

from kelix.data.convert.formats import RowError, chat_layout


def to_messages(record: dict, n_images: int, where: str) -> list[dict]:
    """LLaVA turns -> kit ``messages`` (image parts named ``0.jpg``, ``1.jpg``...); ValueError naming ``where``."""
    try:
        messages = chat_layout(record, list(range(n_images)))
    except RowError as e:
        raise ValueError(f"{where}: {e}") from e
    for m in messages:
        for p in m["content"]:
            if p["type"] == "image":
                p["image"] = f"{p['image']}.jpg"
    return messages


def convert(json_path: str, image_root: str, out_dir: str, prefix: str = "llava", max_count: int = 1000,
            task: str = "vqa", workers: int = 1) -> dict:
    from kelix.data.convert.formats import Options
    from kelix.data.convert.job import Job, run

    m = run(Job("llava", [json_path], out_dir, max_count, prefix, Options(images_root=image_root, task=task)),
            workers=workers)
    return {"written": m["totals"]["samples"], "skipped": m["totals"]["skipped"], "shards": m["totals"]["shards"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipelines.llava_to_shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="LLaVA-style .json list or .jsonl")
    p.add_argument("--images", required=True, help="root directory the records' image paths are relative to")
    p.add_argument("--out", required=True, help="output directory for shards")
    p.add_argument("--prefix", default="llava")
    p.add_argument("--max-count", type=int, default=1000, help="source records per shard")
    p.add_argument("--task", default="vqa", help="task label stored in each sample (vqa, caption, ocr, chat)")
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args(argv)
    print(json.dumps(convert(a.json, a.images, a.out, a.prefix, a.max_count, a.task, a.workers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
