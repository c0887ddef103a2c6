"""Writing samples in the kit's schema to WebDataset shards (converters, pre-tokenization)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image as PILImage

from kelix.data.shards import MANIFEST_SUFFIX, MANIFEST_VERSION


def image_bytes(image, fmt: str = "JPEG") -> bytes:
    """Encode a PIL image (or pass through bytes read from a file)."""
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.convert("RGB").save(buf, format=fmt, quality=95)
    else:
        image.save(buf, format=fmt)
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def make_record(key: str, meta: dict, files: dict | None = None) -> dict:
    """A WebDataset record: ``{key}.json`` plus named files (``0.jpg`` bytes/PIL, ``0.codes.npy`` arrays...)."""
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must not contain '.' or '/' (WebDataset splits names at the first dot)")
    record = {"__key__": key, "json": json.dumps(meta, ensure_ascii=False).encode()}
    for name, value in (files or {}).items():
        if name.endswith(".npy"):
            record[name] = npy_bytes(value)
        elif isinstance(value, PILImage.Image):
            record[name] = image_bytes(value, "PNG" if name.endswith(".png") else "JPEG")
        else:
            record[name] = bytes(value)
    return record


def fsync_path(path: str) -> None:
    """Flush a file's (or a directory's entries') writes to disk: a rename is durable only after
    the renamed data is, and a new directory entry only after its directory is synced."""
    is_dir = os.path.isdir(path)
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if is_dir else 0))
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory; the data itself was synced
        if not is_dir:
            raise
    finally:
        os.close(fd)


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    fsync_path(tmp)
    os.replace(tmp, path)


class ShardSink:
    """Write records into numbered shards ``{prefix}-{i:05d}.tar`` of at most ``max_count`` samples.

    Each shard is written under a temporary name, synced to disk and renamed when complete, so a
    crashed conversion never leaves a truncated shard that looks finished. ``{prefix}.manifest.json``
    lists each finished shard with its sample count (rewritten after each shard); the reader checks
    it, so a shard cut short later (a failed copy) is reported as ``truncated_shard``.
    """

    def __init__(self, out_dir: str, prefix: str = "shard", max_count: int = 1000):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.prefix, self.max_count = out_dir, prefix, max_count
        self.index, self.count, self.paths = 0, 0, []
        self.counts: dict[str, int] = {}
        self._writer, self._tmp = None, None

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.out_dir, self.prefix + MANIFEST_SUFFIX)

    def _open(self):
        from webdataset import TarWriter

        final = os.path.join(self.out_dir, f"{self.prefix}-{self.index:05d}.tar")
        self._tmp = final + ".tmp"
        self._final = final
        self._writer = TarWriter(self._tmp, encoder=False)

    def _close(self):
        if self._writer is not None:
            self._writer.close()
            fsync_path(self._tmp)
            os.replace(self._tmp, self._final)
            self.paths.append(self._final)
            self.counts[os.path.basename(self._final)] = self.count
            write_json_atomic(self.manifest_path, {"version": MANIFEST_VERSION, "shards": {
                name: {"samples": n} for name, n in self.counts.items()}})
            fsync_path(self.out_dir)
            self._writer, self.index, self.count = None, self.index + 1, 0

    def write(self, record: dict):
        if self._writer is None:
            self._open()
        self._writer.write(record)
        self.count += 1
        if self.count >= self.max_count:
            self._close()

    def close(self) -> list[str]:
        self._close()
        return self.paths

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
