"""kelix data convert --format pairs / t2i / text: CSV, TSV, JSONL, parquet, image folders, bytes columns."""

import csv

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.data.convert_helpers import convert, images, png, read_back, skipped, write_jsonl

SPECS = {"a.jpg": ((250, 0, 0), (20, 10)), "b.png": ((0, 0, 250), (12, 16)), "c.png": ((0, 250, 0), (30, 30))}


def close(pixel, color):
    return all(abs(p - c) <= 6 for p, c in zip(pixel, color))


def check_pairs(samples, want):
    """``want``: [(image file, caption)] in order; pixels and sizes are the source image's."""
    assert [(s.task, s.turns[0].parts[1].text) for s in samples] == [("caption", c) for _, c in want]
    for s, (name, _) in zip(samples, want):
        color, size = SPECS[name]
        assert s.images[0].pixels.size == size and close(s.images[0].pixels.getpixel((5, 5)), color), s.key


@pytest.mark.parametrize("ext", ["csv", "tsv"])
def test_pairs_from_csv_and_tsv_with_bad_rows_reported(tmp_path, ext):
    images(tmp_path / "img", SPECS)
    rows = [("a.jpg", "red wide"), ("b.png", "blue tall"), ("bad.jpg", "broken"), ("gone.jpg", "missing"),
            ("c.png", "  "), ("c.png", "green, with a comma\nand a newline")]
    path = tmp_path / f"pairs.{ext}"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t" if ext == "tsv" else ",")
        w.writerow(["image", "caption"])
        w.writerows(rows)
    m = convert("pairs", [path], tmp_path / "out", images_root=str(tmp_path / "img"))
    assert skipped(m) == [(path.name, 2, "corrupt_image"), (path.name, 3, "missing_image"), (path.name, 4, "empty_text")]
    assert m["totals"] | {"bytes": 0} == {"rows": 6, "samples": 3, "shards": 2, "skipped": 3, "resumed_shards": 0,
                                          "bytes": 0}
    samples = read_back(tmp_path / "out", m)
    check_pairs(samples, [("a.jpg", "red wide"), ("b.png", "blue tall"), ("c.png", "green, with a comma\nand a newline")])
    assert [s.meta["source"] for s in samples] == [f"{path.name}:0", f"{path.name}:1", f"{path.name}:5"]


def test_pairs_from_jsonl_with_bad_json_and_named_columns(tmp_path):
    images(tmp_path / "img", SPECS)
    recs = [{"file": "b.png", "alt_text": "blue"}, {}, {"file": "a.jpg", "alt_text": "red"}, {"file": "c.png"}]
    path = write_jsonl(tmp_path / "p.jsonl", recs, bad_lines={1: '{"file": "c.png", "alt_text": '})
    m = convert("pairs", [path], tmp_path / "out", images_root=str(tmp_path / "img"), image_column="file",
                text_column="alt_text")
    assert skipped(m) == [("p.jsonl", 1, "bad_json"), ("p.jsonl", 3, "schema")]
    check_pairs(read_back(tmp_path / "out", m), [("b.png", "blue"), ("a.jpg", "red")])


def test_pairs_from_parquet_with_bytes_and_downloaded_urls_over_several_inputs(tmp_path):
    images(tmp_path / "dl", SPECS)
    t1 = pa.table({"image": [png((250, 0, 0), (20, 10)), b"garbage", png((0, 0, 250), (12, 16))],
                   "caption": ["red", "x", "blue"]})
    pq.write_table(t1, tmp_path / "a.parquet", row_group_size=2)  # several row groups: ranges cross them
    t2 = pa.table({"url": ["https://example.com/x/c.png?size=big", "https://example.com/none.jpg"],
                   "caption": ["green", "gone"]})
    pq.write_table(t2, tmp_path / "b.parquet")
    m = convert("pairs", [tmp_path / "a.parquet", tmp_path / "b.parquet"], tmp_path / "out",
                images_root=str(tmp_path / "dl"), shard_size=2)
    assert skipped(m) == [("a.parquet", 1, "corrupt_image"), ("b.parquet", 1, "missing_image")]
    samples = read_back(tmp_path / "out", m)
    check_pairs(samples, [("a.jpg", "red"), ("b.png", "blue"), ("c.png", "green")])
    # keys are global row numbers over the inputs: unique, and stable whatever the shard size
    assert [s.key for s in samples] == ["pairs-000000000", "pairs-000000002", "pairs-000000003"]


def test_pairs_from_an_image_folder_with_txt_captions(tmp_path):
    images(tmp_path / "photos", SPECS)
    (tmp_path / "photos" / "a.txt").write_text("red\n")
    (tmp_path / "photos" / "c.txt").write_text("green")  # b.png has no caption; bad.jpg neither
    m = convert("pairs", [tmp_path / "photos"], tmp_path / "out")
    assert skipped(m) == [("photos", 1, "empty_text"), ("photos", 2, "empty_text")]
    check_pairs(read_back(tmp_path / "out", m), [("a.jpg", "red"), ("c.png", "green")])


def test_t2i_puts_the_image_in_the_assistant_turn_and_filters_aspect(tmp_path):
    images(tmp_path / "img", SPECS)
    path = write_jsonl(tmp_path / "t.jsonl", [{"image": "a.jpg", "prompt": "wide"}, {"image": "b.png", "prompt": "tall"},
                                              {"image": "c.png", "prompt": "square"}])
    m = convert("t2i", [path], tmp_path / "out", images_root=str(tmp_path / "img"), aspect_range=(0.75, 1.33))
    assert skipped(m) == [("t.jsonl", 0, "aspect_ratio")]  # 20x10 = 2.0; 12x16 = 0.75 is in
    samples = read_back(tmp_path / "out", m)
    assert [s.task for s in samples] == ["t2i", "t2i"]
    assert [(t.role, [p.type for p in t.parts]) for t in samples[1].turns] == [("user", ["text"]),
                                                                               ("assistant", ["image"])]
    assert samples[1].turns[0].text == "square" and samples[1].images[0].pixels.size == (30, 30)

    from kelix.llm.layout import is_t2i

    assert all(is_t2i(s) for s in samples)


def test_text_from_jsonl_and_parquet(tmp_path):
    j = write_jsonl(tmp_path / "t.jsonl", [{"text": "first doc"}, {"text": ""}, {"text": "third\ndoc"}],
                    bad_lines={})
    pq.write_table(pa.table({"content": ["from parquet", None]}), tmp_path / "t.parquet")
    m = convert("text", [j, tmp_path / "t.parquet"], tmp_path / "out", text_column=None)
    assert skipped(m) == [("t.jsonl", 1, "empty_text"), ("t.parquet", 1, "empty_text")]
    samples = read_back(tmp_path / "out", m)
    assert [(s.task, s.kind, s.turns[0].text) for s in samples] == [
        ("text", "segments", "first doc"), ("text", "segments", "third\ndoc"), ("text", "segments", "from parquet")]
