"""Reading VLMEvalKit's benchmark TSVs: one row per question, images inline (base64) or by path.

Read with pandas as VLMEvalKit reads them (``pd.read_csv(path, sep="\t")``), so a cell is missing exactly
when VLMEvalKit finds it missing: empty, or one of pandas' NA strings ("N/A", "NA", "null", "None", "nan"...),
and a numeric column reads as numbers ("1" in a column with a gap becomes 1.0, as VLMEvalKit prints it).

Columns: ``index``, ``image`` (base64; a short value is the ``index`` of the row holding the image, as
VLMEvalKit's MMBench files share images between rotations; MMMU rows hold a list of base64 strings) or
``image_path``, ``question``, ``hint``, option columns ``A``, ``B``..., ``answer``, ``category``,
``l2-category``, ``split``, and per benchmark extras (MathVista: ``question_type``, ``answer_type``,
``precision``, ``choices``, ``answer_option``).
"""

from __future__ import annotations

import ast
import os

from kelix.eval.answers import LETTERS
from kelix.eval.base import DataError, decode_base64, where


def _missing(value) -> bool:
    if value is None:
        return True
    try:
        return bool(value != value)  # NaN, as pandas marks a missing cell
    except (TypeError, ValueError):
        return False


def read_tsv(path: str, required: tuple[str, ...]) -> list[dict]:
    """The rows of a VLMEvalKit TSV, checked for the ``required`` columns and a unique ``index``."""
    import pandas as pd

    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    try:
        rows = pd.read_csv(path, sep="\t").to_dict("records")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable TSV ({str(e).splitlines()[0]})") from None
    if not rows:
        raise DataError(f"{path}: no rows")
    columns = set(rows[0])
    for k in required:
        if k not in columns:
            raise DataError(f"{where(path, None, k)}: missing column (columns: {', '.join(sorted(map(str, columns)))})")
    if "image" not in columns and "image_path" not in columns:
        raise DataError(f"{where(path, None, 'image')}: missing column (neither image nor image_path)")
    seen = set()
    for i, r in enumerate(rows):
        for k in required:
            if _missing(r.get(k)):
                raise DataError(f"{where(path, i, k)}: empty")
        if r["index"] in seen:
            raise DataError(f"{where(path, i, 'index')}: duplicate index {r['index']!r}")
        seen.add(r["index"])
    return rows


def _as_list(value: str) -> list[str]:
    value = str(value)
    if value.startswith("["):
        try:
            return [str(x) for x in ast.literal_eval(value)]  # a list literal, never code
        except (ValueError, SyntaxError):
            pass
    return [value]


def row_images(rows: list[dict], path: str, images: str | None) -> list[list]:
    """Each row's image sources: decoded bytes, or paths (relative to ``images`` or the TSV's folder)."""
    by_index = {str(r["index"]): str(r.get("image", "")) for r in rows}
    base = images or os.path.dirname(os.path.abspath(path))
    out = []
    for i, r in enumerate(rows):
        if not _missing(r.get("image")):
            srcs = []
            for j, v in enumerate(_as_list(r["image"])):
                if len(v) <= 64:  # a reference to the row that holds this image
                    target = by_index.get(v)
                    if target is None or len(target) <= 64:
                        raise DataError(f"{where(path, i, 'image')}: refers to index {v!r}, which holds no image")
                    v = target
                srcs.append(decode_base64(v, where(path, i, f"image[{j}]")))
            out.append(srcs)
        elif not _missing(r.get("image_path")):
            out.append([os.path.join(base, p) for p in _as_list(r["image_path"])])
        else:
            raise DataError(f"{where(path, i, 'image')}: empty (and no image_path)")
    return out


def options_of(row: dict) -> dict[str, str]:
    """The row's options ``{"A": text, ...}``: every letter column with a value, gaps skipped (a row with
    C missing keeps A, B and D, as VLMEvalKit's ``build_choices`` does)."""
    return {c: str(row[c]) for c in LETTERS if c in row and not _missing(row[c])}


def choices_list(value: str, at: str) -> list[str]:
    try:
        out = ast.literal_eval(str(value))
    except (ValueError, SyntaxError):
        raise DataError(f"{at}: not a list literal ({str(value)[:40]!r})") from None
    if not isinstance(out, (list, tuple)):
        raise DataError(f"{at}: not a list ({str(value)[:40]!r})")
    return [str(x) for x in out]


def is_missing(value) -> bool:
    return _missing(value)
