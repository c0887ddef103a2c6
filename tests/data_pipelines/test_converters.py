import json

import pytest
from PIL import Image

from data_pipelines import image_folder_to_shards, llava_to_shards
from kelix.data.shards import Source
from kelix.data.stream import ShardStream


def read_all(pattern):
    s = ShardStream([Source(pattern)], repeat=False, shuffle_buffer=1, shuffle_shards=False)
    return list(s), s.stats


def test_llava_json_converts_to_messages_with_images(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (20, 10), "blue").save(tmp_path / "img" / "a.jpg")
    Image.new("RGB", (10, 20), "red").save(tmp_path / "img" / "b.jpg")
    (tmp_path / "img" / "bad.jpg").write_bytes(b"not an image")
    records = [
        {"id": "x.1", "image": "a.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "Blue."},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "two", "image": ["a.jpg", "b.jpg"], "conversations": [
            {"from": "human", "value": "Compare <image> and <image>."}, {"from": "gpt", "value": "Different."}]},
        {"id": "nomarker", "image": "b.jpg", "conversations": [
            {"from": "human", "value": "Describe."}, {"from": "gpt", "value": "Red."}]},
        {"id": "missing", "image": "nope.jpg", "conversations": [{"from": "human", "value": "<image>"}]},
        {"id": "broken", "image": "bad.jpg", "conversations": [{"from": "human", "value": "<image>"}]},
        {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(records))
    stats = llava_to_shards.convert(str(tmp_path / "llava.json"), str(tmp_path / "img"), str(tmp_path / "out"),
                                    max_count=2)
    assert stats == {"written": 4, "skipped": 2, "shards": 3}  # 2 source records per shard
    samples, s = read_all(str(tmp_path / "out" / "*.tar"))
    assert len(samples) == 4 and not any(k.startswith("skipped/") for k in s)
    first = samples[0]
    assert [p.type for p in first.turns[0].parts] == ["image", "text"] and first.turns[0].text == "What color?"
    assert first.turns[1].text == "Blue." and len(first.turns) == 4 and first.images[0].pixels.size == (20, 10)
    two = samples[1]
    assert [p.type for p in two.turns[0].parts] == ["text", "image", "text", "image", "text"]
    assert [im.pixels.size for im in two.images] == [(20, 10), (10, 20)]
    assert [p.type for p in samples[2].turns[0].parts] == ["image", "text"]  # no marker: image first
    assert samples[3].images == [] and samples[3].turns[1].text == "Hello"


def test_llava_marker_count_mismatch_is_named():
    with pytest.raises(ValueError, match=r"f\[3\]: 2 <image> marker\(s\) but 1 image"):
        llava_to_shards.to_messages({"conversations": [{"from": "human", "value": "<image><image>"}]}, 1, "f[3]")


def test_image_folder_converts_captions(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    for i, color in enumerate(["red", "green"]):
        Image.new("RGB", (16, 16), color).save(d / f"p{i}.png")
        (d / f"p{i}.txt").write_text(f"a {color} square\n")
    Image.new("RGB", (16, 16)).save(d / "nocaption.jpg")
    stats = image_folder_to_shards.convert(str(d), str(tmp_path / "out"))
    assert stats == {"written": 2, "skipped": 1}
    samples, _ = read_all(str(tmp_path / "out" / "*.tar"))
    assert [(x.task, x.turns[0].parts[1].text) for x in samples] == [("caption", "a red square"),
                                                                     ("caption", "a green square")]
    assert samples[1].images[0].pixels.getpixel((0, 0)) == (0, 128, 0)


def test_image_folder_names_that_share_a_key_all_become_distinct_samples(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    colors = {"a.jpg": (250, 0, 0), "a.png": (0, 250, 0), "a b.png": (0, 0, 250), "a_b.png": (250, 250, 0),
              "a-1.png": (0, 250, 250)}
    for name, color in colors.items():
        Image.new("RGB", (16, 16), color).save(d / name)
        (d / (name.rsplit(".", 1)[0] + ".txt")).write_text(f"caption of {name.rsplit('.', 1)[0]}")
    assert image_folder_to_shards.convert(str(d), str(tmp_path / "out")) == {"written": 5, "skipped": 0}
    samples, stats = read_all(str(tmp_path / "out" / "*.tar"))
    assert not [k for k in stats if k.startswith("skipped/")]
    assert len({x.key for x in samples}) == 5
    by_source = {x.meta["source_id"]: x for x in samples}
    assert sorted(by_source) == sorted(colors)
    for name, color in colors.items():  # every image kept, with its own pixels and caption
        x = by_source[name]
        assert all(abs(c - w) <= 4 for c, w in zip(x.images[0].pixels.getpixel((8, 8)), color)), name
        assert x.turns[0].parts[1].text == f"caption of {name.rsplit('.', 1)[0]}"
