"""Row ranges read from a byte offset (JSONL, CSV, TSV) are the rows read from the top of the file."""

import csv
import json

import pytest

from kelix.data.convert.readers import count_rows, read_rows


def rows_of(path, step):
    n, seek = count_rows(str(path), step=step)
    return n, [v for start in range(0, n, step) for _, v in read_rows(str(path), start, min(n, start + step),
                                                                      seek=seek, step=step)]


@pytest.mark.parametrize("step", [1, 2, 3, 7])
def test_csv_and_jsonl_row_ranges_from_offsets(tmp_path, step):
    records = [{"image": f"{i}.png", "caption": f"caption {i}" + ("\nsecond line, quoted" if i % 3 == 1 else "")}
               for i in range(10)]
    for ext, delim in (("csv", ","), ("tsv", "\t")):
        path = tmp_path / f"t.{ext}"
        with open(path, "w", newline="", encoding="utf-8-sig") as f:  # with a byte-order mark, CRLF rows
            w = csv.writer(f, delimiter=delim)
            w.writerow(["image", "caption"])
            for i, r in enumerate(records):
                w.writerow([r["image"], r["caption"]])
                if i == 4:
                    f.write("\r\n")  # a blank row: not a record
        with open(path, encoding="utf-8-sig", newline="") as f:
            want = list(csv.DictReader(f, delimiter=delim))
        assert rows_of(path, step) == (10, want) and want == records
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + ("\n\n" if i == 2 else "\n")
                            for i, r in enumerate(records)) + "   \n")
    n, got = rows_of(path, step)
    assert n == 10 and [json.loads(v) for v in got] == records
    # a range that starts between two offsets
    n, seek = count_rows(str(path), step=step)
    assert [r for _, r in read_rows(str(path), 5, 8, seek=seek, step=step)] == got[5:8]
