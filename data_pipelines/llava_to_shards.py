"""Convert LLaVA-style conversation JSON (LLaVA, ShareGPT4V, M4-Instruct...) to kelix shards.

Input: a JSON list (or JSONL) of ``{"id", "image": "rel/path.jpg" | [paths], "conversations":
[{"from": "human"|"gpt"|"system", "value": "<image>\\nQuestion"}, ...]}``; ``<image>`` marks where each
image goes (images with no marker are put before the first user text, as LLaVA does).
Output: ``{out}/{prefix}-00000.tar``... with ``messages`` samples and the images as ``{key}.{i}.jpg``.
Samples whose image is missing or unreadable are skipped and counted; the conversion goes on.

    python -m data_pipelines.llava_to_shards --json llava.json --images /data/coco --out shards/llava
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from tqdm import tqdm

ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_TAG = "<image>"


def read_records(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def to_messages(record: dict, n_images: int, where: str) -> list[dict]:
    """LLaVA turns -> kit ``messages``; ``<image>`` markers become image parts ``0.jpg``, ``1.jpg``..."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: 'conversations' must be a non-empty list")
    placed, messages = 0, []
    for i, t in enumerate(turns):
        role = ROLE.get(t.get("from"))
        if role is None:
            raise ValueError(f"{where}: conversations[{i}].from {t.get('from')!r} is not human/gpt/system")
        parts = []
        for j, chunk in enumerate(re.split(re.escape(IMAGE_TAG), str(t.get("value", "")))):
            if j > 0:
                parts.append({"type": "image", "image": f"{placed}.jpg"})
                placed += 1
            if chunk.strip():
                parts.append({"type": "text", "text": chunk.strip("\n")})
        messages.append({"role": role, "content": parts})
    if placed > n_images:
        raise ValueError(f"{where}: {placed} <image> markers but {n_images} image(s)")
    first_user = next((m for m in messages if m["role"] == "user"), None)
    if placed < n_images:
        if first_user is None:
            raise ValueError(f"{where}: images without a user turn to put them in")
        first_user["content"][:0] = [{"type": "image", "image": f"{k}.jpg"} for k in range(placed, n_images)]
    return messages


def convert(json_path: str, image_root: str, out_dir: str, prefix: str = "llava", max_count: int = 1000,
            task: str = "vqa") -> dict:
    from kelix.data.decode import decode_image
    from kelix.data.writer import ShardSink, make_record

    records = read_records(json_path)
    stats = {"written": 0, "skipped": 0}
    with ShardSink(out_dir, prefix, max_count) as sink:
        for n, rec in enumerate(tqdm(records, desc="llava -> shards", unit="sample")):
            where = f"{json_path}[{n}]"
            images = rec.get("image") or []
            images = [images] if isinstance(images, str) else list(images)
            try:
                files = {}
                for i, rel in enumerate(images):
                    with open(os.path.join(image_root, rel), "rb") as f:
                        data = f.read()
                    decode_image(data)  # refuse unreadable images now, not at training time
                    files[f"{i}.jpg"] = data
                meta = {"task": task, "messages": to_messages(rec, len(images), where), "source_id": rec.get("id")}
                key = re.sub(r"[^A-Za-z0-9_-]", "_", str(rec.get("id", n))) + f"_{n}"
                sink.write(make_record(key, meta, files))
                stats["written"] += 1
            except (OSError, ValueError) as e:
                stats["skipped"] += 1
                print(f"skipped {where}: {e}", file=sys.stderr)
        stats["shards"] = len(sink.paths) + (1 if sink.count else 0)
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipelines.llava_to_shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="LLaVA-style .json list or .jsonl")
    p.add_argument("--images", required=True, help="root directory the records' image paths are relative to")
    p.add_argument("--out", required=True, help="output directory for shards")
    p.add_argument("--prefix", default="llava")
    p.add_argument("--max-count", type=int, default=1000, help="samples per shard")
    p.add_argument("--task", default="vqa", help="task label stored in each sample (vqa, caption, ocr, chat)")
    a = p.parse_args(argv)
    stats = convert(a.json, a.images, a.out, a.prefix, a.max_count, a.task)
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
