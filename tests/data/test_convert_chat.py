"""kelix data convert --format llava / sharegpt / messages / obelics / img2dataset / hf."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.data.convert_helpers import convert, images, png, read_back, skipped, write_jsonl

SPECS = {"a.jpg": ((250, 0, 0), (20, 10)), "b.png": ((0, 0, 250), (12, 16))}


def parts(turn):
    return [p.type if p.type == "image" else p.text for p in turn.parts]


def test_llava_json_several_images_markers_and_bad_rows(tmp_path):
    images(tmp_path / "img", SPECS)
    recs = [
        {"id": "one", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                          {"from": "gpt", "value": "Red."}]},
        {"id": "two", "image": ["a.jpg", "b.png"], "conversations": [
            {"from": "human", "value": "Compare <image> and <image>."}, {"from": "gpt", "value": "Different."}]},
        {"id": "nomarker", "image": "b.png", "conversations": [{"from": "human", "value": "Describe."},
                                                               {"from": "gpt", "value": "Blue."}]},
        {"id": "missing", "image": "gone.jpg", "conversations": [{"from": "human", "value": "<image>"}]},
        {"id": "broken", "image": ["a.jpg", "bad.jpg"], "conversations": [{"from": "human", "value": "<image><image>"}]},
        {"id": "toomany", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image><image>"}]},
        {"id": "text", "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                         {"from": "gpt", "value": "Hello"}]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(recs))
    m = convert("llava", [tmp_path / "llava.json"], tmp_path / "out", images_root=str(tmp_path / "img"), shard_size=3)
    assert skipped(m) == [("llava.json", 3, "missing_image"), ("llava.json", 4, "corrupt_image"),
                          ("llava.json", 5, "schema")]
    s = read_back(tmp_path / "out", m)
    assert [x.meta["source_id"] for x in s] == ["one", "two", "nomarker", "text"]
    assert parts(s[0].turns[0]) == ["image", "What colour?"] and parts(s[0].turns[1]) == ["Red."]
    assert parts(s[1].turns[0]) == ["Compare ", "image", " and ", "image", "."]
    assert [im.pixels.size for im in s[1].images] == [(20, 10), (12, 16)]
    assert [im.name for im in s[1].images] == ["0.jpg", "1.png"]  # the stored file keeps its real format
    assert parts(s[2].turns[0]) == ["image", "Describe."]  # no marker: the image goes first
    assert [t.role for t in s[3].turns] == ["system", "user", "assistant"] and s[3].images == []
    assert [x.task for x in s] == ["vqa", "vqa", "vqa", "chat"]


def test_sharegpt_and_messages_jsonl(tmp_path):
    images(tmp_path / "img", SPECS)
    recs = [
        {"conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hey"}]},
        {"messages": [{"role": "user", "content": "<image>Which?"}, {"role": "assistant", "content": "Blue"}],
         "images": ["b.png"]},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Red"}]}], "images": ["a.jpg"]},
        {"messages": [{"role": "robot", "content": "?"}]},
        {"messages": [{"role": "user", "content": ""}]},
    ]
    path = write_jsonl(tmp_path / "m.jsonl", recs + [{}], bad_lines={5: "[not json"})
    m = convert("sharegpt", [path], tmp_path / "out", images_root=str(tmp_path / "img"))
    assert skipped(m) == [("m.jsonl", 3, "schema"), ("m.jsonl", 4, "empty_text"), ("m.jsonl", 5, "bad_json")]
    s = read_back(tmp_path / "out", m)
    assert [parts(t) for t in s[0].turns] == [["Hi"], ["Hey"]]
    assert [parts(t) for t in s[1].turns] == [["image", "Which?"], ["Blue"]] and s[1].images[0].pixels.size == (12, 16)
    assert [parts(t) for t in s[2].turns] == [["image", "And this?"], ["Red"]] and s[2].images[0].pixels.size == (20, 10)


def test_obelics_parquet_to_interleaved_segments(tmp_path):
    images(tmp_path / "img", SPECS)
    table = pa.table({  # OBELICS stores image URLs (here: downloaded under images_root) and None for text
        "texts": [["Intro", None, "after the image", None], [None, "only an image"], [None], ["x", None]],
        "images": [[None, "https://example.org/p/a.jpg", None, "b.png"], ["bad.jpg", None], ["a.jpg"], [None, None]],
    })
    pq.write_table(table, tmp_path / "docs.parquet")
    inline = pa.table({"texts": [[None, "inline bytes"], [None, "x"]],
                       "images": [[png((0, 0, 250), (12, 16)), None], [b"broken", None]]})
    pq.write_table(inline, tmp_path / "inline.parquet")
    m = convert("obelics", [tmp_path / "docs.parquet", tmp_path / "inline.parquet"], tmp_path / "out",
                images_root=str(tmp_path / "img"))
    assert skipped(m) == [("docs.parquet", 1, "corrupt_image"), ("docs.parquet", 2, "empty_text"),
                          ("inline.parquet", 1, "corrupt_image")]
    s = read_back(tmp_path / "out", m)
    assert [x.task for x in s] == ["interleaved"] * 3 and [x.kind for x in s] == ["segments"] * 3
    assert parts(s[0].turns[0]) == ["Intro", "image", "after the image", "image"]
    assert [im.pixels.size for im in s[0].images] == [(20, 10), (12, 16)]
    assert parts(s[1].turns[0]) == ["x"]
    assert parts(s[2].turns[0]) == ["image", "inline bytes"] and s[2].images[0].pixels.size == (12, 16)


def test_img2dataset_folder_is_resharded_and_validated(tmp_path):
    from webdataset import TarWriter

    src = tmp_path / "i2d"
    src.mkdir()
    sizes = [(20, 10), (12, 16), (30, 30), (8, 24), (16, 16)]
    for shard in range(2):
        with TarWriter(str(src / f"{shard:05d}.tar")) as w:
            for j in range(3 if shard == 0 else 2):
                k = shard * 3 + j
                rec = {"__key__": f"{shard:05d}{j:04d}", "jpg": png((40 * k, 0, 0), sizes[k]), "txt": f"caption {k}",
                       "json": {"url": f"https://x/{k}.jpg"}}
                if k == 1:
                    rec["jpg"] = b"truncated"
                if k == 3:
                    rec["txt"] = ""
                w.write(rec)
    (src / "00000.parquet").write_bytes(b"img2dataset metadata, not read")
    m = convert("img2dataset", [src], tmp_path / "out", shard_size=2)
    assert [i["path"].rsplit("/", 1)[1] for i in m["inputs"]] == ["00000.tar", "00001.tar"]
    assert skipped(m) == [("00000.tar", 1, "corrupt_image"), ("00001.tar", 0, "empty_text")]
    s = read_back(tmp_path / "out", m)
    assert [(x.meta["source_id"], x.turns[0].parts[1].text, x.images[0].pixels.size) for x in s] == [
        ("000000000", "caption 0", (20, 10)), ("000000002", "caption 2", (30, 30)), ("000010001", "caption 4", (16, 16))]


def test_hf_save_to_disk_by_column_mapping(tmp_path):
    datasets = pytest.importorskip("datasets")  # installed with the dev extra (lmms-eval)
    images(tmp_path / "img", SPECS)
    feats = datasets.Features({"picture": datasets.Image(), "words": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"picture": [str(tmp_path / "img" / "a.jpg"), str(tmp_path / "img" / "b.png"),
                                                 str(tmp_path / "img" / "a.jpg")],
                                     "words": ["red", "blue", ""]}, features=feats)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hfds"))
    m = convert("hf", [tmp_path / "hfds"], tmp_path / "out", image_column="picture", text_column="words")
    assert skipped(m) == [("hfds", 2, "empty_text")]
    s = read_back(tmp_path / "out", m)
    assert [(x.task, x.turns[0].parts[1].text, x.images[0].pixels.size) for x in s] == [
        ("caption", "red", (20, 10)), ("caption", "blue", (12, 16))]

    text = datasets.Dataset.from_dict({"text": ["doc one", "doc two"]})
    text.save_to_disk(str(tmp_path / "hftext"))
    m = convert("hf", [tmp_path / "hftext"], tmp_path / "out2")
    assert [(x.task, x.turns[0].text) for x in read_back(tmp_path / "out2", m)] == [("text", "doc one"),
                                                                                   ("text", "doc two")]
