"""VLMEvalKit's prediction files (.xlsx, .tsv, .csv) read and written; a .pkl refused in one line."""

import json

import pandas as pd
import pytest

from kelix.cli import main
from kelix.eval import get_benchmark
from kelix.eval.base import DataError
from kelix.eval.predfiles import read_prediction_file, write_prediction_file
from tests.eval.test_readers import MMB, write_tsv

PREDS = {"0": "=B", "1": "", "1000000": "The answer is A", "2000000": "D", "3000000": "C", "1000001": "A"}


@pytest.mark.parametrize("fmt", ["xlsx", "tsv", "csv"])
def test_written_files_read_back_and_as_vlmevalkit_reads_them(tmp_path, fmt):
    bench = get_benchmark("mmbench-en")
    items = bench.read(write_tsv(tmp_path / "MMBench_DEV_EN.tsv", MMB))
    path = write_prediction_file(str(tmp_path / f"kelix_MMBench_DEV_EN.{fmt}"), items, PREDS)
    back = read_prediction_file(path)
    # an empty prediction reads back as "nan" (VLMEvalKit: str(NaN)); "=B" stays text, not a formula
    assert {k: r["prediction"] for k, r in back.items()} == {**PREDS, "1": "nan"}
    assert [r["id"] for r in back.values()] == [0, 1_000_000, 2_000_000, 3_000_000, 1, 1_000_001]
    # what VLMEvalKit's load() sees: the benchmark's columns (no image), options per rotation, the prediction
    df = pd.read_excel(path) if fmt == "xlsx" else pd.read_csv(path, sep="\t" if fmt == "tsv" else ",")
    assert "image" not in df.columns and {"index", "question", "A", "B", "answer", "category", "prediction"} <= set(df)
    if fmt == "xlsx":  # a text cell, not a formula (Excel would compute "=B")
        from openpyxl import load_workbook

        ws = load_workbook(path).active
        col = [c.value for c in ws[1]].index("prediction") + 1
        assert ws.cell(row=2, column=col).data_type == "s"
    row = df[df["index"] == 1_000_000].iloc[0]
    assert (row["A"], row["B"], row["answer"]) == ("dog", "bird", "A")
    assert pd.isna(df[df["index"] == 1].iloc[0]["C"])  # a missing option stays missing


def test_a_vlmevalkit_xlsx_is_scored_like_its_jsonl(tmp_path):
    data = write_tsv(tmp_path / "AI2D_TEST.tsv", MMB)
    # as VLMEvalKit's infer_data_job dumps it: the data columns without image, prediction as str
    df = pd.read_csv(data, sep="\t").drop(columns=["image"])
    df["prediction"] = ["(B) dog", "blue"]
    df.to_excel(tmp_path / "kelix_AI2D_TEST.xlsx", index=False)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"id": i, "prediction": p}) + "\n"
                                              for i, p in zip(df["index"], df["prediction"])))
    base = ["eval", "score", "--benchmark", "ai2d", "--data", data]
    assert main([*base, "--predictions", str(tmp_path / "kelix_AI2D_TEST.xlsx"), "--out", str(tmp_path / "x")]) == 0
    assert main([*base, "--predictions", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "j"),
                 "--write-predictions", "tsv"]) == 0
    x, j = (json.load(open(tmp_path / d / "scores.json")) for d in ("x", "j"))
    assert x == j and x["overall"]["acc"] == 1.0 and x["missing"] == 0
    back = read_prediction_file(str(tmp_path / "j" / "kelix_AI2D_TEST.tsv"))
    assert {k: r["prediction"] for k, r in back.items()} == {"0": "(B) dog", "1": "blue"}


def test_pickles_and_bad_files_are_refused_in_one_line(tmp_path, capsys):
    data = write_tsv(tmp_path / "a.tsv", MMB)
    (tmp_path / "p.pkl").write_bytes(b"\x80\x04K\x01.")
    args = ["eval", "score", "--benchmark", "ai2d", "--data", data, "--out", str(tmp_path / "o"), "--predictions"]
    assert main([*args, str(tmp_path / "p.pkl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "p.pkl: a pickle is refused (the kit never unpickles)" in err[0]
    pd.DataFrame({"index": [0], "answer": ["B"]}).to_csv(tmp_path / "n.csv", index=False)
    with pytest.raises(DataError, match=r"n.csv field 'prediction': missing column"):
        read_prediction_file(str(tmp_path / "n.csv"))
    assert main([*args, str(tmp_path / "missing.xlsx")]) == 2
    assert "missing.xlsx: no such file" in capsys.readouterr().err
