"""Prediction files in VLMEvalKit's formats (``.xlsx``, ``.tsv``, ``.csv``), read and written.

VLMEvalKit's ``infer_data_job`` writes ``<model>_<dataset>.xlsx`` (or ``.tsv`` / ``.csv``): the benchmark's
columns without ``image``, plus ``prediction``; its ``evaluate`` reads such a file back with pandas.
:func:`read_prediction_file` takes ``index`` and ``prediction`` from one (a prediction cell is read as text;
an empty cell is the text "nan", as VLMEvalKit's ``str(x)`` makes it); :func:`write_prediction_file` writes
one VLMEvalKit can score. A ``.pkl`` is refused: the kit never unpickles.
"""

from __future__ import annotations

import math
import os

from kelix.eval.base import DataError, Item, where

FORMATS = ("xlsx", "tsv", "csv")


def _ext(path: str) -> str:
    return os.path.splitext(path)[1].lower().lstrip(".")


def read_prediction_file(path: str) -> dict[str, dict]:
    """``{str(index): {"id": index, "prediction": text}}`` of a VLMEvalKit prediction file."""
    import pandas as pd

    ext = _ext(path)
    if ext == "pkl":
        raise DataError(f"{path}: a pickle is refused (the kit never unpickles); write the predictions as "
                        ".xlsx, .tsv or .csv (VLMEvalKit's dump() writes all three)")
    if ext not in FORMATS:
        raise DataError(f"{path}: unknown prediction file type (.jsonl, .xlsx, .tsv or .csv)")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    try:
        if ext == "xlsx":
            df = pd.read_excel(path, dtype={"prediction": str})
        else:
            df = pd.read_csv(path, sep="\t" if ext == "tsv" else ",", dtype={"prediction": str})
    except (ValueError, OSError, pd.errors.ParserError) as e:
        raise DataError(f"{path}: not a readable .{ext} file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    for k in ("index", "prediction"):
        if k not in df.columns:
            raise DataError(f"{where(path, None, k)}: missing column (columns: {', '.join(map(str, df.columns))})")
    out = {}
    for i, (idx, pred) in enumerate(zip(df["index"], df["prediction"])):
        if isinstance(idx, float):
            if math.isnan(idx):
                raise DataError(f"{where(path, i, 'index')}: empty")
            idx = int(idx) if idx.is_integer() else idx
        idx = idx.item() if hasattr(idx, "item") else idx  # numpy scalars as Python values
        out[str(idx)] = {"id": idx, "prediction": str(pred)}  # str(NaN) == "nan", as VLMEvalKit reads it
    return out


def _row(item: Item) -> dict:
    """The item's own TSV columns when it came from one (image excepted), else its id, prompt and answer."""
    if "row" in item.meta:
        return {k: v for k, v in item.meta["row"].items() if k != "image"} | {"index": item.id}
    answer = item.answer if isinstance(item.answer, (str, int, float)) else str(item.answer)
    return {"index": item.id, "question": item.prompt, "answer": answer, "category": item.category}


def write_prediction_file(path: str, items: list[Item], predictions: dict[str, str]) -> str:
    """Write the answered ``items`` with their ``prediction`` as VLMEvalKit's prediction file (by extension)."""
    import pandas as pd

    ext = _ext(path)
    if ext not in FORMATS:
        raise DataError(f"{path}: prediction files are written as .xlsx, .tsv or .csv")
    rows = [{**_row(it), "prediction": predictions[it.key]} for it in items if it.key in predictions]
    df = pd.DataFrame(rows)
    tmp = path + ".tmp." + ext
    if ext == "xlsx":
        _write_xlsx(df, tmp)
    else:
        import csv

        df.to_csv(tmp, sep="\t" if ext == "tsv" else ",", index=False, encoding="utf-8", quoting=csv.QUOTE_ALL)
    os.replace(tmp, path)
    return path


def _write_xlsx(df, path: str) -> None:
    """Every text cell written as text (a prediction starting with "=" is no formula, as VLMEvalKit's
    ``strings_to_formulas=False``); characters a worksheet cannot hold (control characters) are dropped."""
    from openpyxl import Workbook
    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

    wb = Workbook()
    ws = wb.active
    ws.append([str(c) for c in df.columns])
    for r, row in enumerate(df.itertuples(index=False), start=2):
        for c, v in enumerate(row, start=1):
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            cell = ws.cell(row=r, column=c)
            if isinstance(v, str):
                cell.value = ILLEGAL_CHARACTERS_RE.sub("", v)
                cell.data_type = "s"
            else:
                cell.value = v.item() if hasattr(v, "item") else v
    wb.save(path)
