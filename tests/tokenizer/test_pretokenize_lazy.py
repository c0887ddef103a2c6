"""`kelix tokenize` decodes lazily, as the stream does: a JPEG whose header opens but whose pixels are
cut is a counted ``corrupt_image`` skip with a reproducible message; an aspect ratio the tokenizer's
image config refuses is an ``aspect_ratio`` skip (it stopped the job before); the rest get codes."""

from dataclasses import replace

from benchmarks.bench_data import photo_jpeg
from kelix.data.stream import ShardStream
from kelix.tokenizer.model import KelixTokenizer, tiny_config
from kelix.tokenizer.pretokenize import tokenize_shard
from tests.conftest import write_shard


def test_deferred_decode_and_aspect_errors_are_counted_skips(tmp_path):
    seg = {"segments": [{"type": "image", "image": "0.jpg"}, {"type": "text", "text": "x"}]}
    cut = photo_jpeg(200, 150, seed=1)
    src = write_shard(tmp_path / "in.tar", [
        {"__key__": "ok", "json": seg, "0.jpg": photo_jpeg(200, 150, seed=2)},
        {"__key__": "cut", "json": seg, "0.jpg": cut[: len(cut) // 2]},
        {"__key__": "wide", "json": seg, "0.jpg": photo_jpeg(600, 100, seed=3)}])
    tok = KelixTokenizer(tiny_config()).eval()
    tok.config.image = replace(tok.config.image, aspect_range=(0.5, 2.0))
    skipped = []
    assert tokenize_shard(tok, src, str(tmp_path / "out.tar"), skipped=skipped) == {
        "samples": 1, "images": 1, "skipped": 2}
    assert [(s["key"], s["reason"]) for s in skipped] == [("cut", "corrupt_image"), ("wide", "aspect_ratio")]
    assert skipped[0]["message"].startswith("image 0.jpg cannot be decoded: OSError: image file is truncated")
    assert skipped[1]["message"] == "image 0.jpg: image 600x100 has aspect 6.00 outside [0.5, 2.0]"
    assert [s.key for s in ShardStream([str(tmp_path / "out.tar")], shuffle_buffer=1, repeat=False)] == ["ok"]
