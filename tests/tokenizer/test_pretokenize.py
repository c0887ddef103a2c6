"""`kelix tokenize` on a shard with broken samples: each is skipped and counted, the rest get their codes."""

import numpy as np
import torch

from kelix.data.stream import ShardStream
from kelix.tokenizer.model import KelixTokenizer, tiny_config
from kelix.tokenizer.pretokenize import tokenize_shard, tokenize_shards
from tests.conftest import jpeg_bytes, write_shard


def _sample(key, color):
    return {"__key__": key, "json": {"task": "caption", "segments": [{"type": "image", "image": "0.jpg"},
                                                                       {"type": "text", "text": key}]},
            "0.jpg": jpeg_bytes((56, 56), color)}


def test_a_duplicate_key_is_skipped_and_the_rest_of_the_shard_tokenized(tmp_path):
    torch.manual_seed(0)
    tok = KelixTokenizer(tiny_config()).eval()
    src = write_shard(tmp_path / "in.tar", [_sample("a", (200, 0, 0)), _sample("b", (0, 200, 0)),
                                            _sample("a", (0, 0, 200)), _sample("c", (9, 9, 9))])
    stats = tokenize_shard(tok, src, str(tmp_path / "out.tar"))
    assert stats == {"samples": 3, "images": 3, "skipped": 1}
    out = list(ShardStream([str(tmp_path / "out.tar")], shuffle_buffer=1, repeat=False))
    assert [s.key for s in out] == ["a", "b", "c"]
    for s in out:
        img = s.images[0]
        assert np.array_equal(img.codes, tok.encode([img.pixels])[0].numpy())


def _shards(tmp_path):
    """Four input shards of different sizes; shard 1 holds a duplicate key, shard 2 an undecodable image."""
    sizes, paths = [3, 2, 4, 1], []
    for j, n in enumerate(sizes):
        recs = [_sample(f"s{j}k{i}", (40 * i, 200 - 30 * j, 17 * j)) for i in range(n)]
        if j == 1:
            recs.append(_sample(f"s{j}k0", (1, 2, 3)))
        if j == 2:
            recs.insert(1, {**_sample("s2bad", (0, 0, 0)), "0.jpg": b"not a jpeg"})
        paths.append(write_shard(tmp_path / "in" / f"part-{j:05d}.tar", recs))
    return paths


def _tars(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def _no_resume(m):
    return {**m, "totals": {k: v for k, v in m["totals"].items() if k != "resumed_shards"}}


def test_tokenize_writes_a_manifest_with_the_skipped_samples(tmp_path):
    (tmp_path / "in").mkdir()
    src = _shards(tmp_path)
    torch.manual_seed(0)
    tok = KelixTokenizer(tiny_config()).eval()
    m = tokenize_shards(tok, src, str(tmp_path / "out"), batch_size=3, progress=False)
    assert m["totals"] | {"bytes": 0} == {"samples": 10, "images": 10, "shards": 4, "skipped": 2, "bytes": 0,
                                          "resumed_shards": 0}
    assert {n: s["samples"] for n, s in m["shards"].items()} == {f"part-{j:05d}.tar": n for j, n in
                                                                 enumerate([3, 2, 4, 1])}
    for name, s in m["shards"].items():
        assert s["bytes"] == (tmp_path / "out" / name).stat().st_size
    assert m["skipped_by_reason"] == {"corrupt_image": 1, "duplicate_key": 1}
    assert [(s["source"], s["key"], s["reason"]) for s in m["skipped"]] == [
        (src[1], "s1k0", "duplicate_key"), (src[2], "s2bad", "corrupt_image")]
    # the shard reader checks the counts of the manifest: every sample is read back
    out = list(ShardStream(str(tmp_path / "out" / "*.tar"), shuffle_buffer=1, shuffle_shards=False, repeat=False))
    assert len(out) == 10


KILL_AFTER_RENAME = """
import os, signal, sys
import kelix.tokenizer.pretokenize as p
real, calls = p.tokenize_shard, []
def tokenize_shard(*a, **k):
    stats = real(*a, **k)
    calls.append(1)
    if len(calls) == 3:  # the third shard renamed into place but not recorded: killed there
        os.kill(os.getpid(), signal.SIGKILL)
    return stats
p.tokenize_shard = tokenize_shard
sys.exit(p.main(sys.argv[1:]))
"""


def test_a_killed_tokenize_resumed_gives_the_bytes_of_an_uninterrupted_run(tmp_path, monkeypatch):
    import json
    import subprocess
    import sys

    import kelix.tokenizer.pretokenize as pretok

    (tmp_path / "in").mkdir()
    src = _shards(tmp_path)
    torch.manual_seed(0)
    KelixTokenizer(tiny_config()).save_pretrained(str(tmp_path / "tok"))
    args = ["--tokenizer", str(tmp_path / "tok"), "--shards", *src, "--batch-size", "3", "--device", "cpu"]
    assert pretok.main([*args, "--out", str(tmp_path / "full")]) == 0
    want = _tars(tmp_path / "full")
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_RENAME, *args, "--out", str(tmp_path / "part")],
                          capture_output=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    part = tmp_path / "part"
    assert sorted(_tars(part)) == [f"part-{j:05d}.tar" for j in range(3)] and len(list(part.glob(".tokenize/*"))) == 2
    with open(part / "part-00000.tar", "r+b") as f:  # and a finished shard cut short later (a failed copy)
        f.truncate(3000)
    redone = []
    real = pretok.tokenize_shard
    monkeypatch.setattr(pretok, "tokenize_shard", lambda tok, s, *a, **k: redone.append(s) or real(tok, s, *a, **k))
    assert pretok.main([*args, "--out", str(part)]) == 0
    assert redone == [src[0], src[2], src[3]]  # shard 1 kept; 0 damaged, 2 unrecorded, 3 never started
    assert _tars(part) == want
    m = json.loads((part / "tokenize.manifest.json").read_text())
    assert m["totals"]["resumed_shards"] == 1
    assert _no_resume(m) == _no_resume(json.loads((tmp_path / "full" / "tokenize.manifest.json").read_text()))
