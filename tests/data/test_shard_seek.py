"""Reading a shard from a resume point: the samples before it are counted from the member headers and
their data is never read (a local tar is skipped through by seeks), with the same samples as a full read."""

import io
import os
import random
import tarfile

from kelix.data.shards import read_shard
from tests.conftest import write_shard


def records(n: int, size: int = 50_000) -> list[dict]:
    rng = random.Random(0)
    seg = {"segments": [{"type": "image", "image": "0.jpg"}, {"type": "text", "text": "x"}]}
    out = [{"__key__": f"k{i:03d}", "json": seg, "0.jpg": rng.randbytes(size + 97 * i)} for i in range(n)]
    out.insert(7, {**out[2]})  # k002 again: a duplicate after the resume point of one seen before it
    return out


class CountingFile(io.FileIO):
    read_bytes = 0

    def read(self, size=-1):
        data = super().read(size)
        CountingFile.read_bytes += len(data)
        return data

    def readinto(self, b):
        n = super().readinto(b)
        CountingFile.read_bytes += n or 0
        return n


def test_reading_from_a_resume_point_gives_the_full_reads_samples(tmp_path):
    shard = write_shard(tmp_path / "s.tar", records(12))
    full = list(read_shard(shard, max_member_bytes=50_000 + 97 * 9))  # k010, k011 are over the cap
    assert [i for i, _ in full] == list(range(13))
    assert full[7][1]["__error__"][0] == "duplicate_key" and full[12][1]["__error__"][0] == "oversized_member"
    for start in (0, 3, 7, 12, 13, 20):
        assert list(read_shard(shard, start, max_member_bytes=50_000 + 97 * 9)) == full[start:], start


def test_the_data_before_the_resume_point_is_never_read(tmp_path, monkeypatch):
    shard = write_shard(tmp_path / "s.tar", records(20))
    extracted = []
    extract = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, m: extracted.append(m.name) or extract(self, m))
    monkeypatch.setattr(tarfile, "bltn_open", lambda name, mode="rb", *a, **k: CountingFile(name, mode.replace("b", "")))
    CountingFile.read_bytes = 0
    got = list(read_shard(shard, start=18))
    assert [raw["__key__"] for _, raw in got] == ["k017", "k018", "k019"]
    assert {n.split(".")[0] for n in extracted} == {"k017", "k018", "k019"}  # no member before them
    assert CountingFile.read_bytes < 0.25 * os.path.getsize(shard)  # headers only: 18 of 21 samples seeked over
