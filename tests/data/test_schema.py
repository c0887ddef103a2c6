import numpy as np
import pytest
from PIL import Image as PILImage

from kelix.data.schema import SampleError, parse_sample

RED = PILImage.new("RGB", (8, 8), "red")


def test_messages_with_image_parts():
    fields = {"json": {"task": "vqa", "messages": [
        {"role": "user", "content": [{"type": "image", "image": "0.jpg"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "red"}]}, "0.jpg": RED}
    s = parse_sample(fields, "a.tar", "k1")
    assert (s.kind, s.task, [t.role for t in s.turns]) == ("messages", "vqa", ["user", "assistant"])
    assert s.turns[0].parts[0].image.pixels is RED and s.turns[0].parts[1].text == "What?"
    assert s.turns[1].text == "red" and len(s.images) == 1


def test_segments_and_pretokenized_codes_instead_of_pixels():
    codes = np.zeros((2, 3, 4), dtype=np.int16)
    fields = {"json": {"segments": [{"type": "text", "text": "x"}, {"type": "image", "image": "0.jpg"}]},
              "0.codes.npy": codes}
    s = parse_sample(fields, "a.tar", "k")
    img = s.images[0]
    assert s.kind == "segments" and s.task == "interleaved" and img.pixels is None and img.codes is codes


def test_img2dataset_layout_reads_as_caption():
    s = parse_sample({"jpg": RED, "txt": "a red square", "json": {"url": "http://x", "width": 8}}, "b.tar", "000")
    assert s.task == "caption" and [p.type for p in s.turns[0].parts] == ["image", "text"]
    assert s.turns[0].parts[1].text == "a red square" and s.images[0].pixels is RED


@pytest.mark.parametrize("meta, reason, needle", [
    ({"messages": [{"role": "robot", "content": "hi"}]}, "schema", "json.messages[0].role 'robot'"),
    ({"messages": [{"role": "user"}]}, "schema", "json.messages[0].content is missing"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "schema", "json.messages[0].content[0].type"),
    ({"segments": [{"type": "image", "image": "3.png"}]}, "missing_image", "json.segments[0] names image '3.png'"),
    ({"segments": [{"type": "text", "text": 5}]}, "schema", "json.segments[0].text must be a string"),
    ({"task": "dance", "segments": []}, "schema", "json.task 'dance'"),
    ({"foo": 1}, "schema", "neither 'messages' nor 'segments'"),
])
def test_errors_name_shard_key_and_field(meta, reason, needle):
    with pytest.raises(SampleError) as e:
        parse_sample({"json": meta}, "shards/x-0001.tar", "key42")
    msg = str(e.value)
    assert e.value.reason == reason and msg.startswith("shards/x-0001.tar:key42: ") and needle in msg
    assert "\n" not in msg
