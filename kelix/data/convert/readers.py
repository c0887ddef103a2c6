"""Source files as numbered rows: each input is counted first (so shards can be planned and resumed
by row range) and then read back as a row range ``[start, stop)``.

A row is a Python value: a dict (CSV/TSV, parquet, JSON lists, ``datasets`` arrow, image folders), a
line of text (JSONL: parsed by the converter so that one bad line is one skipped row), or a raw
WebDataset sample (img2dataset tars). Libraries read the formats: ``csv``, ``json``, pyarrow,
``datasets``, and the kit's own shard reader.
"""

from __future__ import annotations

import csv
import functools
import glob
import itertools
import json
import os
import sys
from collections.abc import Iterator

IMAGE_FILE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TABLE_EXTS = (".csv", ".tsv", ".jsonl", ".ndjson", ".json", ".parquet", ".tar")


def kind_of(path: str) -> str:
    """What reads ``path``: ``csv``, ``tsv``, ``jsonl``, ``json``, ``parquet``, ``tar``, ``hf`` or ``folder``."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json")):
            return "hf"
        return "folder"
    ext = os.path.splitext(path)[1].lower()
    if ext not in TABLE_EXTS:
        raise ValueError(f"input {path}: cannot read {ext or 'a file without extension'} "
                         f"(one of {', '.join(TABLE_EXTS)}, a folder, or a datasets save_to_disk folder)")
    return {".ndjson": "jsonl"}.get(ext, ext[1:])


def expand_inputs(paths: list[str]) -> list[str]:
    """Input paths, globs expanded and sorted; a folder of tars or tables stands for its files."""
    out = []
    for p in paths:
        found = sorted(glob.glob(os.path.expanduser(p))) if glob.has_magic(p) else [os.path.expanduser(p)]
        if not found or not all(os.path.exists(f) for f in found):
            raise FileNotFoundError(f"input {p}: no such file or folder")
        for f in found:
            if os.path.isdir(f) and kind_of(f) == "folder":
                inner = sorted(x for x in glob.glob(os.path.join(glob.escape(f), "*")) if x.lower().endswith(TABLE_EXTS))
                if inner:  # img2dataset output folder (tars, parquet/json metadata beside them: tars only)
                    tars = [x for x in inner if x.endswith(".tar")]
                    out.extend(tars or inner)
                    continue
            out.append(f)
    return out


# -- counting
def count_rows(path: str, hf_split: str | None = None) -> int:
    kind = kind_of(path)
    if kind == "jsonl":
        with open(path, encoding="utf-8", errors="replace") as f:
            return sum(1 for line in f if line.strip())
    if kind in ("csv", "tsv"):
        return sum(1 for _ in _csv_rows(path))
    if kind == "json":
        return len(_json_list(path))
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if kind == "tar":
        return len(_tar_keys(path))
    if kind == "hf":
        return len(_hf_dataset(path, hf_split))
    return len(_folder_images(path))


# -- reading a row range
def read_rows(path: str, start: int, stop: int, hf_split: str | None = None) -> Iterator[tuple[int, object]]:
    """``(row, value)`` for rows ``start <= row < stop`` of one input."""
    kind = kind_of(path)
    if kind == "jsonl":
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = (line for line in f if line.strip())
            yield from enumerate_range(itertools.islice(lines, start, stop), start)
    elif kind in ("csv", "tsv"):
        yield from enumerate_range(itertools.islice(_csv_rows(path), start, stop), start)
    elif kind == "json":
        yield from enumerate_range(_json_list(path)[start:stop], start)
    elif kind == "parquet":
        yield from _parquet_rows(path, start, stop)
    elif kind == "tar":
        from kelix.data.shards import read_shard

        for n, raw in read_shard(path, start):
            if n >= stop:
                break
            yield n, raw
    elif kind == "hf":
        ds = _hf_dataset(path, hf_split)
        yield from enumerate_range(ds.select(range(start, stop)), start)
    else:
        yield from enumerate_range(_folder_images(path)[start:stop], start)


def enumerate_range(rows, start: int):
    return zip(itertools.count(start), rows)


def _csv_rows(path: str):
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # captions and base64 columns can be long
    with open(path, encoding="utf-8", newline="") as f:
        yield from csv.DictReader(f, delimiter="\t" if path.lower().endswith(".tsv") else ",")


@functools.lru_cache(maxsize=4)
def _json_list(path: str) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"input {path}: not valid JSON ({e}); a file of one record per line should end in .jsonl") from e
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} / {"annotations": [...]}
    if not isinstance(data, list):
        raise ValueError(f"input {path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _parquet_rows(path: str, start: int, stop: int):
    """Only the row groups overlapping ``[start, stop)`` are read."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    first = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        lo, hi = max(start, first), min(stop, first + n)
        if lo < hi:
            table = pf.read_row_group(g).slice(lo - first, hi - lo)
            yield from enumerate_range(table.to_pylist(), lo)
        first += n
        if first >= stop:
            break


def _tar_keys(path: str) -> list[str]:
    """Sample keys of a tar from its member headers (``r:`` seeks over the data)."""
    import tarfile

    from webdataset.tariterators import base_plus_ext

    keys: list[str] = []
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            key = base_plus_ext(info.name)[0] if info.isreg() else None
            if key is not None and (not keys or keys[-1] != key):
                keys.append(key)
    return keys


@functools.lru_cache(maxsize=2)
def _hf_dataset(path: str, split: str | None):
    try:
        import datasets
    except ImportError as e:
        raise ValueError(f"input {path}: a datasets save_to_disk folder needs the datasets library "
                         "(pip install datasets)") from e
    datasets.disable_progress_bars()
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split is None and len(ds) == 1:
            split = next(iter(ds))
        if split not in ds:
            raise ValueError(f"input {path}: splits {', '.join(ds)}; choose one with --split")
        ds = ds[split]
    # image columns as {"bytes", "path"}: the converter checks and stores the encoded file as it is
    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(name, datasets.Image(decode=False))
    return ds


@functools.lru_cache(maxsize=4)
def _folder_images(path: str) -> list[dict]:
    """An image folder: each image with the caption in its same-named ``.txt`` (None when absent)."""
    rows = []
    for name in sorted(os.listdir(path)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_FILE_EXTS:
            continue
        txt = os.path.join(path, stem + ".txt")
        caption = None
        if os.path.isfile(txt):
            with open(txt, encoding="utf-8") as f:
                caption = f.read().strip()
        rows.append({"image": os.path.join(path, name), "caption": caption, "id": name})
    return rows
