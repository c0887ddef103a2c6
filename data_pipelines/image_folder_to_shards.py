"""Convert a folder of images with same-named ``.txt`` captions to kelix caption shards.

``photos/a.jpg`` + ``photos/a.txt`` -> a ``segments`` sample (image, caption), task ``caption``. Images
without a caption (or unreadable ones) are skipped and counted. Sample keys are the file stems with
characters other than ``[A-Za-z0-9_-]`` replaced by ``_``; names that would share a key (``a.jpg`` and
``a.png``, ``a b.jpg`` and ``a_b.jpg``) get ``-1``, ``-2``... appended, so every image is kept; the
file name is kept in the sample's ``source`` field.

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


def unique_keys(names: list[str]) -> list[str]:
    """One WebDataset key per file name, distinct even where the sanitised stems collide."""
    used: set[str] = set()
    out = []
    for name in names:
        base = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.splitext(name)[0]) or "_"
        key, n = base, 0
        while key in used:
            n += 1
            key = f"{base}-{n}"
        used.add(key)
        out.append(key)
    return out


def convert(image_dir: str, out_dir: str, prefix: str = "images", max_count: int = 1000) -> dict:
    from kelix.data.decode import decode_image
    from kelix.data.writer import ShardSink, make_record

    names = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(EXTS))
    if not names:
        raise FileNotFoundError(f"{image_dir}: no image ({', '.join(EXTS)}) found")
    stats = {"written": 0, "skipped": 0}
    with ShardSink(out_dir, prefix, max_count) as sink:
        for name, key in tqdm(list(zip(names, unique_keys(names))), desc="images -> shards", unit="image"):
            stem, ext = os.path.splitext(name)
            try:
                with open(os.path.join(image_dir, stem + ".txt"), encoding="utf-8") as f:
                    caption = f.read().strip()
                with open(os.path.join(image_dir, name), "rb") as f:
                    data = f.read()
                decode_image(data)
                fname = "0" + (".jpg" if ext.lower() == ".jpeg" else ext.lower())
                meta = {"task": "caption", "source": name, "segments": [{"type": "image", "image": fname},
                                                                         {"type": "text", "text": caption}]}
                sink.write(make_record(key, meta, {fname: data}))
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
