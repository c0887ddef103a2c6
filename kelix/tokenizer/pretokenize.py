"""``kelix tokenize``: write shards with each image's code grid ``{key}.{i}.codes.npy`` beside its pixels.

Every input shard gives one output shard of the same name in ``--out``; samples keep all their
members (images too, unless ``--drop-pixels``), plus int16/int32 ``[h, w, N]`` code grids named after
the image stem (``0.jpg`` -> ``0.codes.npy``; an img2dataset ``jpg`` -> ``codes.npy``). Finished
output shards are skipped, so an interrupted run resumes; ``--rank/--world`` split the shards
between processes. Members the kit does not decode (and pickles) are not copied.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import replace

import numpy as np

log = logging.getLogger("kelix.tokenizer")


def codes_field(image_field: str) -> str:
    from kelix.data.schema import CODES_SUFFIX, image_stem

    stem = image_stem(image_field)
    return f"{stem}.{CODES_SUFFIX}" if stem else CODES_SUFFIX


def tokenize_shard(tokenizer, src: str, dst: str, batch_size: int = 32, drop_pixels: bool = False, bar=None) -> dict:
    """Encode every image of shard ``src`` and write ``dst`` (atomically). Returns counts."""
    from webdataset import TarWriter

    from kelix.data.decode import decode_image, extension
    from kelix.data.schema import IMAGE_EXTS
    from kelix.data.stream import read_shard
    from kelix.data.writer import npy_bytes

    dtype = np.int16 if tokenizer.config.K <= np.iinfo(np.int16).max + 1 else np.int32
    stats = {"samples": 0, "images": 0, "skipped": 0}
    pending: list[tuple[dict, list[str], list]] = []

    def flush(sink):
        images = [im for _, _, ims in pending for im in ims]
        codes = iter(tokenizer.encode(images, batch_size=batch_size) if images else [])
        for record, names, _ in pending:
            for name in names:
                record[codes_field(name)] = npy_bytes(next(codes).cpu().numpy().astype(dtype))
                if drop_pixels:
                    del record[name]
            sink.write(record)
            stats["samples"] += 1
            stats["images"] += len(names)
        if bar is not None:
            bar.update(len(pending))
        pending.clear()

    tmp = f"{dst}.tmp{os.getpid()}"
    with TarWriter(tmp, encoder=False) as sink:
        for _, raw in read_shard(src):
            key = raw["__key__"]
            if "__error__" in raw:  # the shard reader's verdict (duplicate key, oversized member)
                log.warning("%s:%s: skipped (%s): %s", src, key, *raw["__error__"])
                stats["skipped"] += 1
                continue
            record = {"__key__": key, **{k: v for k, v in raw.items() if not k.startswith("__")}}
            names = sorted(k for k in record if k != "__key__" and extension(k) in IMAGE_EXTS)
            try:
                ims = [decode_image(record[n]) for n in names]
            except Exception as e:  # noqa: BLE001 - a corrupt image skips its sample, counted
                log.warning("%s:%s: skipped, image cannot be decoded: %s", src, key, e)
                stats["skipped"] += 1
                continue
            pending.append((record, names, ims))
            if sum(len(p[1]) for p in pending) >= batch_size:
                flush(sink)
        flush(sink)
    os.replace(tmp, dst)
    return stats


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kelix tokenize", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, help="exported tokenizer directory (kelix export-tokenizer)")
    p.add_argument("--shards", required=True, nargs="+", help="input shard patterns (braces and globs)")
    p.add_argument("--out", required=True, help="output directory (same shard names)")
    p.add_argument("--drop-pixels", action="store_true", help="write codes instead of the pixels")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder batch")
    p.add_argument("--device", help="default: cuda if available")
    p.add_argument("--fixed-size", type=int, help="resize every image to this square size (e.g. 504 for t2i targets)")
    p.add_argument("--max-pixels", type=int, help="override the tokenizer's native-resolution pixel budget")
    p.add_argument("--rank", type=int, default=0, help="this process's share of the shards: shards[rank::world]")
    p.add_argument("--world", type=int, default=1, help="number of processes sharing the shards")
    p.add_argument("--overwrite", action="store_true", help="redo output shards that already exist")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not 0 <= a.rank < a.world:
        p.error(f"--rank {a.rank} must be in [0, --world {a.world})")

    import torch
    from tqdm import tqdm

    from kelix.data.shards import Source
    from kelix.tokenizer.model import KelixTokenizer

    shards = Source(a.shards).expand()[a.rank :: a.world]
    names = [os.path.basename(s) for s in shards]
    if len(set(names)) != len(names):
        raise ValueError("input shards share file names; tokenize each directory into its own --out")
    tok = KelixTokenizer.from_pretrained(a.tokenizer)
    img = tok.config.image
    if a.fixed_size is not None:
        img = replace(img, fixed_size=a.fixed_size)
    if a.max_pixels is not None:
        img = replace(img, max_pixels=a.max_pixels)
    tok.config.image = img
    tok.to(a.device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    os.makedirs(a.out, exist_ok=True)
    total = {"samples": 0, "images": 0, "skipped": 0, "shards": 0}
    with tqdm(desc="tokenize", unit="sample") as bar:
        for src, name in zip(shards, names):
            dst = os.path.join(a.out, name)
            if os.path.exists(dst) and not a.overwrite:
                log.info("%s exists, skipped", dst)
                continue
            stats = tokenize_shard(tok, src, dst, a.batch_size, a.drop_pixels, bar)
            for k, v in stats.items():
                total[k] += v
            total["shards"] += 1
    print(f"tokenized {total['shards']} shard(s): {total['samples']} samples, {total['images']} images, "
          f"{total['skipped']} skipped -> {a.out}")
    return 0
