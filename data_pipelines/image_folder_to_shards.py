"""Convert a folder of images with same-named ``.txt`` captions to kelix caption shards.

``photos/a.jpg`` + ``photos/a.txt`` -> a ``segments`` sample (image, caption), task ``caption``. Images
without a caption (or unreadable ones) are skipped and counted.

    python -m data_pipelines.image_folder_to_shards --images photos/ --out shards/photos
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from tqdm import tqdm

EXTS = (".jpg", ".jpeg", ".png", ".webp")


def convert(image_dir: str, out_dir: str, prefix: str = "images", max_count: int = 1000) -> dict:
    from kelix.data.decode import decode_image
    from kelix.data.writer import ShardSink, make_record

    names = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(EXTS))
    if not names:
        raise FileNotFoundError(f"{image_dir}: no image ({', '.join(EXTS)}) found")
    stats = {"written": 0, "skipped": 0}
    with ShardSink(out_dir, prefix, max_count) as sink:
        for name in tqdm(names, desc="images -> shards", unit="image"):
            stem, ext = os.path.splitext(name)
            try:
                with open(os.path.join(image_dir, stem + ".txt"), encoding="utf-8") as f:
                    caption = f.read().strip()
                with open(os.path.join(image_dir, name), "rb") as f:
                    data = f.read()
                decode_image(data)
                fname = "0" + (".png" if ext.lower() == ".png" else ".jpg")
                meta = {"task": "caption", "segments": [{"type": "image", "image": fname},
                                                        {"type": "text", "text": caption}]}
                sink.write(make_record(re.sub(r"[^A-Za-z0-9_-]", "_", stem), meta, {fname: data}))
                stats["written"] += 1
            except (OSError, ValueError) as e:
                stats["skipped"] += 1
                print(f"skipped {name}: {e}", file=sys.stderr)
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipelines.image_folder_to_shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--prefix", default="images")
    p.add_argument("--max-count", type=int, default=1000)
    a = p.parse_args(argv)
    print(json.dumps(convert(a.images, a.out, a.prefix, a.max_count)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
