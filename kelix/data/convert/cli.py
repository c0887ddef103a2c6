"""``kelix data``: convert public dataset formats to shards, validate shards, and describe them.

    kelix data convert --format pairs --input captions.csv --images-root imgs/ --out shards/cap
    kelix data validate 'shards/cap/*.tar'
    kelix data stats 'shards/cap/*.tar' --text-tokenizer builtin:bytes

See docs/data.md for every format.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures.process import BrokenProcessPool

from kelix.data.convert.formats import FORMATS
from kelix.data.schema import TASKS

SUBVERBS = {"convert": "source files -> shards (resumable, parallel, with a manifest)",
            "validate": "check shards against the sample schema; report bad samples",
            "stats": "samples per task, images per sample, size/length histograms, blocks per sample"}


def convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kelix data convert", description="Convert source rows to kelix shards; "
                                "rerun the same command to resume. Formats: " + ", ".join(FORMATS) + ".")
    p.add_argument("--format", required=True, choices=sorted(FORMATS))
    p.add_argument("--input", required=True, nargs="+", help="files (csv tsv jsonl json parquet tar), folders, globs")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--images-root", help="folder that relative image paths (and downloaded URLs) are under")
    p.add_argument("--shard-size", type=int, default=1000, help="source rows per shard (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="processes (default: %(default)s)")
    p.add_argument("--task", choices=TASKS, help="task label stored in each sample (default: the format's own)")
    p.add_argument("--prefix", help="shard file prefix (default: the format)")
    p.add_argument("--image-column", help="column holding the image (default: image, images, image_path, url...)")
    p.add_argument("--text-column", help="column holding the caption / prompt / text (default: caption, text...)")
    p.add_argument("--aspect-range", type=float, nargs=2, metavar=("LO", "HI"),
                   help="skip images whose width/height is outside [LO, HI] (generation stage: 0.75 1.33)")
    p.add_argument("--max-pixels", type=int, help="skip images with more pixels (read from the header)")
    p.add_argument("--split", help="hf: the split of a DatasetDict")
    p.add_argument("--hf-as", choices=[f for f in FORMATS if f not in ("hf", "img2dataset")],
                   help="hf: which format reads the rows (default: guessed from the columns)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def convert_main(argv: list[str] | None = None) -> int:
    a = convert_parser().parse_args(argv)

    from kelix.data.convert.formats import Options
    from kelix.data.convert.job import Job, run

    try:
        opts = Options(images_root=a.images_root, image_column=a.image_column, text_column=a.text_column,
                       task=a.task, aspect_range=tuple(a.aspect_range) if a.aspect_range else None,
                       max_pixels=a.max_pixels, hf_as=a.hf_as)
        job = Job(a.format, a.input, a.out, a.shard_size, a.prefix, opts, a.split)
        m = run(job, workers=a.workers, progress=not a.quiet)
    except (ValueError, FileNotFoundError) as e:
        print(f"kelix data convert: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, BrokenProcessPool) as e:
        why = "interrupted" if isinstance(e, KeyboardInterrupt) else "a worker process died (out of memory?)"
        print(f"kelix data convert: {why}; finished shards are kept: rerun the same command to resume",
              file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 1
    t = m["totals"]
    print(f"{t['samples']} sample(s) in {t['shards']} shard(s) under {a.out} ({t['resumed_shards']} kept from "
          f"an earlier run); {t['skipped']} row(s) skipped" + (f": {json.dumps(m['skipped_by_reason'])}"
                                                                if t["skipped"] else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBVERBS:
        lines = ["usage: kelix data {convert,validate,stats} [options]", ""]
        lines += [f"  {k:<10}{v}" for k, v in SUBVERBS.items()]
        bad = argv and argv[0] not in ("-h", "--help")
        print((f"kelix data: unknown command {argv[0]!r}\n\n" if bad else "") + "\n".join(lines),
              file=sys.stderr if bad else sys.stdout)
        return 2 if bad else 0
    verb, rest = argv[0], argv[1:]
    if verb == "convert":
        return convert_main(rest)
    if verb == "validate":
        from kelix.data.validate_cli import main as validate

        return validate(rest, prog="kelix data validate")
    from kelix.data.convert.stats import main as stats

    return stats(rest)
