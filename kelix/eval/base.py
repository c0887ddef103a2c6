"""What every benchmark is: a reader of its files, a prompt builder and a scorer, registered by name.

A benchmark reads its published files into :class:`Item` s (validating every row before a model
loads: one :class:`DataError` line naming the file, row and field), builds the prompt the reference
toolkit builds, scores one prediction (``score_item``) and aggregates the per-item scores overall
and per category (``aggregate``; the default is the mean of each metric).
"""

from __future__ import annotations

import base64
import binascii
import importlib
import io
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

BENCHMARKS: dict[str, type[Benchmark]] = {}

# name -> module that registers it: a benchmark's module is imported only when it is asked for
_MODULES = {
    **dict.fromkeys(["mmbench-en", "mmbench-cn", "seed-bench", "ai2d", "realworldqa", "mmmu", "mathvista"],
                    "kelix.eval.mcq"),
    **dict.fromkeys(["ocrbench", "textvqa", "chartqa"], "kelix.eval.vqa"),
    **dict.fromkeys(["synthetic-vqa", "synthetic-ocr", "synthetic-t2i"], "kelix.eval.synthetic"),
    "synthetic-dense": "kelix.eval.synthetic_dense",
    **dict.fromkeys(["geneval", "dpg-bench", "wise"], "kelix.eval.generation"),
}


class DataError(ValueError):
    """A benchmark file that does not have what its format promises (file, row, field in the message)."""


def where(file: str, row: int | str | None = None, fld: str | None = None) -> str:
    out = str(file)
    if row is not None:
        out += f" row {row}"
    if fld is not None:
        out += f" field {fld!r}"
    return out


@dataclass
class Item:
    """One benchmark question (or generation prompt).

    Args:
        id: the benchmark's own id (MMBench ``index``, TextVQA ``question_id``) or the 0-based row.
        prompt: the text given to the model (built as the reference toolkit builds it).
        answer: the gold answer(s), in the benchmark's own form.
        images: image sources: a path, raw bytes or a PIL image (loaded by :func:`load_image`).
        category: what per-category scores group by.
        meta: anything else the scorer needs (options, question type, rotation group...).
    """

    id: Any
    prompt: str
    answer: Any = None
    images: list = field(default_factory=list)
    category: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The id as predictions.jsonl compares it (ids may be ints in one file and strings in another)."""
        return str(self.id)


def decode_base64(text: str, at: str) -> bytes:
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as e:
        raise DataError(f"{at}: not base64 ({e})") from None


def load_image(src, at: str = "image"):
    """An RGB PIL image from a path, bytes or a PIL image; a :class:`DataError` naming ``at`` if it does not decode."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(src, Image.Image):
        return src.convert("RGB")
    try:
        if isinstance(src, (bytes, bytearray)):
            img = Image.open(io.BytesIO(src))
        else:
            if not os.path.isfile(src):
                raise DataError(f"{at}: image file {src!r} does not exist")
            img = Image.open(src)
        img.load()
        return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"{at}: image does not decode ({type(e).__name__}: {e})") from None


class Benchmark:
    """Base class; subclasses set ``name``, ``files``, ``metrics`` and implement ``read`` and ``score_item``.

    ``kind`` is ``"understand"`` (answers scored here) or ``"generate"`` (images written for the
    benchmark's own scorer, or scored by a checker here).
    """

    name: str = ""
    kind: str = "understand"
    files: str = ""  # what --data points at, in the benchmark's published format
    metrics: tuple[str, ...] = ("acc",)
    max_new_tokens: int = 32
    judge = None  # a kelix.eval.judge.Judge, for benchmarks whose reference uses one (--judge-url)

    def read(self, data: str, images: str | None = None) -> list[Item]:
        raise NotImplementedError

    def score_item(self, item: Item, prediction: str) -> dict[str, float]:
        raise NotImplementedError

    def check_options(self) -> None:
        """Raise ``ValueError`` for run options the benchmark cannot use (before the model loads)."""

    def limit(self, items: list[Item], n: int | None) -> list[Item]:
        """The first ``n`` items (``--limit``)."""
        return items if n is None else items[:n]

    def check_images(self, items: list[Item], data: str) -> None:
        """Decode every image once, so a broken one stops the run before the model loads."""
        for it in items:
            for j, src in enumerate(it.images):
                load_image(src, where(data, it.id, f"image[{j}]" if len(it.images) > 1 else "image"))

    def aggregate(self, items: list[Item], scores: dict[str, dict[str, float]], predictions: dict[str, str]) -> dict:
        """``{"overall": {metric: mean}, "per_category": {cat: {metric: mean}}, "count": n}`` over scored items
        (``scores`` and ``predictions`` are keyed by :attr:`Item.key`)."""
        return mean_scores(items, scores)


def mean_scores(items: list[Item], scores: dict[str, dict[str, float]]) -> dict:
    """Means of each numeric metric over the scored items, overall and per category; a text entry ``path``
    (which rule decided the item: ``rule``, ``judge``, ``none``) is counted in ``decided_by`` instead."""
    total: dict[str, list[float]] = defaultdict(list)
    cats: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    paths: dict[str, int] = defaultdict(int)
    n = 0
    for it in items:
        s = scores.get(it.key)
        if s is None:
            continue
        n += 1
        for k, v in s.items():
            if k == "path":
                paths[v] += 1
                continue
            total[k].append(float(v))
            if it.category:
                cats[it.category][k].append(float(v))
    mean = lambda d: {k: sum(v) / len(v) for k, v in d.items()}  # noqa: E731
    out = {"overall": mean(total), "per_category": {c: mean(d) for c, d in sorted(cats.items())}, "count": n}
    if paths:
        out["decided_by"] = dict(sorted(paths.items()))
    return out


def register(cls: type[Benchmark]) -> type[Benchmark]:
    """Class decorator: make ``cls`` available as ``get_benchmark(cls.name)``."""
    BENCHMARKS[cls.name] = cls
    return cls


def names() -> list[str]:
    return sorted(_MODULES)


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called ``name`` (a ``ValueError`` listing the known names otherwise)."""
    if name not in _MODULES:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(names())}")
    importlib.import_module(_MODULES[name])
    return BENCHMARKS[name]()
