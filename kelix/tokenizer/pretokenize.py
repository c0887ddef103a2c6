"""``kelix tokenize``: write shards with each image's code grid ``{key}.{i}.codes.npy`` beside its pixels.

Every input shard gives one output shard of the same name in ``--out``; samples keep all their
members (images too, unless ``--drop-pixels``), plus int16/int32 ``[h, w, N]`` code grids named after
the image stem (``0.jpg`` -> ``0.codes.npy``; an img2dataset ``jpg`` -> ``codes.npy``). Members the
kit does not decode (and pickles) are not copied; ``--rank/--world`` split the shards between processes.

A resumable job like ``kelix data convert``: each finished output shard leaves a record
``{out}/.tokenize/{name}.json`` (samples, bytes, skipped samples), and a rerun keeps the shards whose
record matches the job (tokenizer, options, input shard) and whose file has the recorded size.
Shards are byte-reproducible, so a resumed run gives an uninterrupted run's bytes.
``{out}/tokenize.manifest.json`` (``tokenize-r{rank}`` with ``--world``) lists the shards, totals
and every skipped sample with its reason, source shard and key.
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


def tokenize_shard(tokenizer, src: str, dst: str, batch_size: int = 32, drop_pixels: bool = False, bar=None,
                   skipped: list | None = None) -> dict:
    """Encode every image of shard ``src`` and write ``dst`` (atomically, byte-reproducibly). Returns counts;
    each skipped sample is appended to ``skipped`` as ``{"source", "key", "reason", "message"}``."""
    from webdataset import TarWriter

    from kelix.data.decode import decode_image, extension
    from kelix.data.images import resize_image
    from kelix.data.schema import IMAGE_EXTS, SampleError
    from kelix.data.stream import read_shard
    from kelix.data.writer import fsync_path, npy_bytes

    cfg = tokenizer.image_config
    dtype = np.int16 if tokenizer.config.K <= np.iinfo(np.int16).max + 1 else np.int32
    stats = {"samples": 0, "images": 0, "skipped": 0}
    pending: list[tuple[dict, list[str], list]] = []

    def skip(key, reason, message):
        log.warning("%s:%s: skipped (%s): %s", src, key, reason, message)
        stats["skipped"] += 1
        if skipped is not None:
            skipped.append({"source": src, "key": key, "reason": reason, "message": message})

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
    with TarWriter(tmp, encoder=False, mtime=0.0) as sink:  # fixed mtime: a redone shard has the same bytes
        for _, raw in read_shard(src):
            key = raw["__key__"]
            if "__error__" in raw:  # the shard reader's verdict (duplicate key, oversized member)
                skip(key, *raw["__error__"])
                continue
            record = {"__key__": key, **{k: v for k, v in raw.items() if not k.startswith("__")}}
            names = sorted(k for k in record if k != "__key__" and extension(k) in IMAGE_EXTS)
            ims = []
            for n in names:
                try:
                    # decoded and resized as the training stream does (lazy: a large JPEG is decoded at a
                    # reduced scale, ImageConfig.draft), so the codes are those training would compute;
                    # the tokenizer's own resize then keeps the size
                    where = f"image {n}"
                    ims.append(resize_image(decode_image(record[n], lazy=True, where=where), cfg, where=where))
                except SampleError as e:  # a deferred decode error, an aspect ratio out of range: counted
                    skip(key, e.reason, str(e))  # its message carries no object address (reproducible)
                    break
                except Exception as e:  # noqa: BLE001 - a corrupt image skips its sample, counted
                    # the exception's type only: PIL's message holds an object address, and the manifest is reproducible
                    skip(key, "corrupt_image", f"image {n} cannot be decoded ({type(e).__name__})")
                    break
            if len(ims) < len(names):
                continue
            pending.append((record, names, ims))
            if sum(len(p[1]) for p in pending) >= batch_size:
                flush(sink)
        flush(sink)
    fsync_path(tmp)
    os.replace(tmp, dst)
    return stats


def tokenize_shards(tokenizer, shards: list[str], out_dir: str, batch_size: int = 32, drop_pixels: bool = False,
                    job: dict | None = None, prefix: str = "tokenize", overwrite: bool = False,
                    progress: bool = True) -> dict:
    """Tokenize (or finish tokenizing) ``shards`` into ``out_dir``; return the manifest it writes.
    ``job``: what else decides the output (tokenizer, image options), part of each record's fingerprint."""
    import hashlib
    import json

    from tqdm import tqdm

    from kelix.data.convert.job import load_record, summarize
    from kelix.data.shards import MANIFEST_SUFFIX, MANIFEST_VERSION
    from kelix.data.writer import write_json_atomic

    names = [os.path.basename(s) for s in shards]
    if len(set(names)) != len(names):
        raise ValueError("input shards share file names; tokenize each directory into its own --out")
    desc = {"job": job or {}, "drop_pixels": drop_pixels, "K": tokenizer.config.K}
    fp = hashlib.sha1(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]
    rec_dir = os.path.join(out_dir, ".tokenize")
    os.makedirs(rec_dir, exist_ok=True)
    records, resumed = [], 0
    with tqdm(desc="tokenize", unit="sample", disable=not progress) as bar:
        for src, name in zip(shards, names):
            rec_path = os.path.join(rec_dir, name + ".json")
            source = {"path": os.path.abspath(src), "bytes": os.path.getsize(src)}
            rec = None if overwrite else load_record(rec_path, fp, out_dir, source=source)
            if rec is not None:
                log.info("%s: done before, kept", name)
                resumed += 1
            else:
                skipped: list[dict] = []
                dst = os.path.join(out_dir, name)
                stats = tokenize_shard(tokenizer, src, dst, batch_size, drop_pixels, bar, skipped)
                rec = {"version": MANIFEST_VERSION, "job": fp, "source": source, "images": stats["images"],
                       "shards": {name: {"samples": stats["samples"], "bytes": os.path.getsize(dst)}},
                       "skipped": skipped}
                write_json_atomic(rec_path, rec)  # after the shard's rename: a record always means a whole shard
            records.append(rec)
    summary = summarize(records)
    summary["totals"].update(images=sum(r["images"] for r in records), resumed_shards=resumed)
    manifest = {"version": MANIFEST_VERSION, "job": fp, "inputs": [os.path.abspath(s) for s in shards], **summary}
    write_json_atomic(os.path.join(out_dir, prefix + MANIFEST_SUFFIX), manifest)
    return manifest


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
    p.add_argument("--overwrite", action="store_true", help="redo output shards that are already done")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not 0 <= a.rank < a.world:
        p.error(f"--rank {a.rank} must be in [0, --world {a.world})")

    import torch

    from kelix.data.shards import Source
    from kelix.tokenizer.model import KelixTokenizer

    shards = Source(a.shards).expand()[a.rank :: a.world]
    tok = KelixTokenizer.from_pretrained(a.tokenizer)
    img = tok.config.image
    if a.fixed_size is not None:
        img = replace(img, fixed_size=a.fixed_size)
    if a.max_pixels is not None:
        img = replace(img, max_pixels=a.max_pixels)
    tok.config.image = img
    tok.to(a.device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    os.makedirs(a.out, exist_ok=True)
    job = {"tokenizer": os.path.abspath(a.tokenizer), "image": repr(img)}
    m = tokenize_shards(tok, shards, a.out, a.batch_size, a.drop_pixels, job,
                        prefix="tokenize" if a.world == 1 else f"tokenize-r{a.rank:03d}", overwrite=a.overwrite)
    t = m["totals"]
    print(f"tokenized {t['shards']} shard(s) ({t['resumed_shards']} done before): {t['samples']} samples, "
          f"{t['images']} images, {t['skipped']} skipped {m['skipped_by_reason']} -> {a.out}")
    return 0
