"""Reading one shard: duplicate keys, oversized members, and manifests that catch a shard cut short."""

import io
import json
import os
import random
import tarfile

import pytest
from PIL import Image

from kelix.data.shards import Source, read_shard
from kelix.data.stream import ShardStream
from kelix.data.writer import ShardSink, make_record
from tests.conftest import jpeg_bytes, text_records, write_shard
from tests.data.test_stream import KeyOnly


class KeyText(KeyOnly):
    def __call__(self, sample):
        return sample.key, sample.turns[0].text


def stream(paths, **kw) -> ShardStream:
    return ShardStream([Source(paths)], processor=KeyText(), repeat=False, shuffle_buffer=1, shuffle_shards=False,
                       **kw)


def skipped(s: ShardStream) -> dict:
    return {k: v for k, v in s.stats.items() if k.startswith("skipped/")}


def test_a_duplicate_key_is_counted_and_the_rest_of_the_shard_is_kept(tmp_path):
    recs = text_records("k", 6)
    dup_next = {**recs[2], "json": {"segments": [{"type": "text", "text": "second k2"}]}}
    dup_later = {**recs[1], "json": {"segments": [{"type": "text", "text": "second k1"}]}}
    # k2 twice in a row (webdataset raises "duplicate file name" there), k1 again further on
    shard = write_shard(tmp_path / "dup.tar", recs[:3] + [dup_next] + recs[3:5] + [dup_later] + recs[5:])
    s = stream(shard)
    got = list(s)
    assert got == [(r["__key__"], r["json"]["segments"][0]["text"]) for r in recs]  # the first of each key kept
    assert skipped(s) == {"skipped/duplicate_key": 2}
    # indices count the duplicates too, so a resume offset into the shard is unchanged by them
    assert [i for i, _ in read_shard(shard, start=4)] == [4, 5, 6, 7]
    assert next(read_shard(shard, start=3))[1]["__error__"][0] == "duplicate_key"


def test_an_oversized_member_skips_its_sample_unread(tmp_path, monkeypatch):
    noise = Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3))
    buf = io.BytesIO()
    noise.save(buf, format="PNG")
    big, small = buf.getvalue(), jpeg_bytes((8, 8))
    assert len(big) > 2000 > len(small)
    seg = {"segments": [{"type": "image", "image": "0.jpg"}, {"type": "text", "text": "x"}]}
    shard = write_shard(tmp_path / "big.tar", [{"__key__": "a", "json": seg, "0.jpg": small},
                                               {"__key__": "b", "json": seg, "0.png": big},
                                               {"__key__": "c", "json": seg, "0.jpg": small}])
    read = []
    extract = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, m: read.append(m.name) or extract(self, m))
    s = stream(shard, max_member_bytes=2000)
    assert [k for k, _ in s] == ["a", "c"]
    assert skipped(s) == {"skipped/oversized_member": 1}
    assert "b.0.png" not in read and "b.json" in read  # the big member's bytes were never read
    assert [k for k, _ in stream(shard)] == ["a", "b", "c"]  # the default cap (64 MiB) keeps it


def write_kit_shards(out, n: int, per_shard: int) -> list[str]:
    with ShardSink(str(out), "part", max_count=per_shard) as sink:
        for i in range(n):
            sink.write(make_record(f"s{i:03d}", {"segments": [{"type": "text", "text": f"t{i}"}]}))
    return sink.paths


def cut_before_sample(path: str, index: int):
    """Truncate a tar exactly at the header of its ``index``-th sample's first member (no end marker)."""
    with tarfile.open(path) as tar:
        offset = next(m.offset for m in tar.getmembers() if m.name.startswith(f"s{index:03d}."))
    with open(path, "r+b") as f:
        f.truncate(offset)


def test_the_writer_records_sample_counts_and_a_shard_cut_at_a_header_is_reported(tmp_path):
    paths = write_kit_shards(tmp_path, 10, 4)
    with open(tmp_path / "part.manifest.json") as f:
        manifest = json.load(f)
    assert manifest == {"version": 1, "shards": {"part-00000.tar": {"samples": 4}, "part-00001.tar": {"samples": 4},
                                                 "part-00002.tar": {"samples": 2}}}
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    assert len(list(stream(paths))) == 10 and not skipped(stream(paths))

    cut_before_sample(paths[1], 6)  # shard 1 holds samples 4..7: it now reads as a valid tar of 4, 5
    with tarfile.open(paths[1]) as tar:
        assert len(tar.getmembers()) == 2  # plain tar (and webdataset) see nothing wrong
    s = stream(paths)
    assert [k for k, _ in s] == [f"s{i:03d}" for i in (0, 1, 2, 3, 4, 5, 8, 9)]
    assert skipped(s) == {"skipped/truncated_shard": 1}


def test_a_malformed_manifest_fails_at_start_naming_it(tmp_path):
    paths = write_kit_shards(tmp_path, 3, 4)
    (tmp_path / "part.manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"shard manifest .*part\.manifest\.json: cannot be read"):
        stream(paths)
