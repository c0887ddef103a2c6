"""Convert a folder of images with same-named ``.txt`` captions to kelix caption shards.

Kept for existing scripts: this is ``kelix data convert --format pairs --input FOLDER`` (see
docs/data.md), with the same resumable, manifest-writing job. ``photos/a.jpg`` + ``photos/a.txt`` -> a
``segments`` sample (image, caption), task ``caption``; images without a caption (or unreadable ones)
are skipped and listed in the manifest. Keys are row numbers (unique whatever the file names); the file
name is kept in the sample's ``source_id`` field.

    python -m data_pipelines.image_folder_to_shards --images photos/ --out shards/photos
"""

from __future__ import annotations

import argparse
import json
import sys


def convert(image_dir: str, out_dir: str, prefix: str = "images", max_count: int = 1000, workers: int = 1) -> dict:
    from kelix.data.convert.formats import Options
    from kelix.data.convert.job import Job, run

    m = run(Job("pairs", [image_dir], out_dir, max_count, prefix, Options()), workers=workers)
    return {"written": m["totals"]["samples"], "skipped": m["totals"]["skipped"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipelines.image_folder_to_shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--prefix", default="images")
    p.add_argument("--max-count", type=int, default=1000, help="images per shard")
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args(argv)
    print(json.dumps(convert(a.images, a.out, a.prefix, a.max_count, a.workers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
