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
def count_rows(path: str, hf_split: str | None = None, step: int = 1000) -> tuple[int, list[int] | None]:
    """``(rows, seek)``: ``seek[k]`` is the byte offset of row ``k * step`` in a text file (JSONL, CSV),
    so a worker starts reading near its rows instead of at the top of the file; None for the others."""
    kind = kind_of(path)
    if kind in ("jsonl", "csv", "tsv"):
        seek, n = [], 0
        for _, before in _text_rows(path, kind):
            if n % step == 0:
                seek.append(before)
            n += 1
        return n, seek
    if kind == "json":
        return len(_json_list(path)), None
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows, None
    if kind == "tar":
        return len(_tar_keys(path)), None
    if kind == "hf":
        return len(_hf_dataset(path, hf_split)), None
    return len(_folder_images(path)), None


def _text_rows(path: str, kind: str, offset: int | None = None, header: list[str] | None = None):
    """``(row, byte offset where it starts)`` of a JSONL (the line's text) or CSV/TSV (a dict) file,
    from ``offset`` on (a CSV read from an offset needs its ``header``). Read in binary, so that the
    offsets are exact; the ``csv`` module parses (quoted newlines included)."""
    with open(path, "rb") as f:
        if kind == "jsonl":
            pos = f.seek(offset or 0)
            for raw in f:
                if raw.strip():
                    yield raw.decode("utf-8", errors="replace"), pos
                pos += len(raw)
            return
        consumed = [f.seek(offset or 0)]

        def lines():
            for raw in f:
                consumed[0] += len(raw)
                yield raw.decode("utf-8", errors="replace")

        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # captions and base64 columns can be long
        reader = csv.reader(lines(), delimiter="\t" if kind == "tsv" else ",")
        if header is None:
            header = next(reader, [])
            if header:
                header[0] = header[0].lstrip("\ufeff")  # a UTF-8 byte-order mark
        before = consumed[0]
        for fields in reader:
            if fields:  # csv.DictReader skips blank rows too
                yield {h: fields[i] if i < len(fields) else None for i, h in enumerate(header)}, before
            before = consumed[0]


def csv_header(path: str, kind: str) -> list[str]:
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        header = next(csv.reader(f, delimiter="\t" if kind == "tsv" else ","), [])
    if header:
        header[0] = header[0].lstrip("\ufeff")
    return header


# -- reading a row range
def read_rows(path: str, start: int, stop: int, hf_split: str | None = None, seek: list[int] | None = None,
              step: int = 1000) -> Iterator[tuple[int, object]]:
    """``(row, value)`` for rows ``start <= row < stop`` of one input (``seek``, ``step``: from :func:`count_rows`)."""
    kind = kind_of(path)
    if kind in ("jsonl", "csv", "tsv"):
        k = start // step if seek else 0
        header = csv_header(path, kind) if kind != "jsonl" and k else None
        rows = _text_rows(path, kind, seek[k] if k else None, header)
        for n, (value, _) in enumerate(rows, k * step):
            if n >= stop:
                break
            if n >= start:
                yield n, value
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
