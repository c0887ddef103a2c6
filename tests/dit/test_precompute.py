"""`kelix precompute-dit`: shards -> latent.npy + cond.npy shards that train through the precomputed path."""

import torch

from kelix.cli import main
from kelix.data.stream import ShardStream
from kelix.dit.conditions import PromptBytesConditions
from kelix.dit.data import DiTProcessor, vae_pixels
from kelix.dit.vae import VAEConfig, load_vae
from tests.dit.conftest import COND_DIM


def test_precomputed_shards_hold_the_vae_latents_and_conditions(synthetic_dir, tmp_path, capsys):
    src = [str(synthetic_dir / "caption-00000.tar"), str(synthetic_dir / "vqa-00000.tar")]
    assert main(["precompute-dit", "--shards", *src, "--out", str(tmp_path / "pre"), "--tiny-vae-seed", "0",
                 "--smoke-prompt-dim", str(COND_DIM), "--target-size", "16", "--batch-size", "3",
                 "--samples-per-shard", "5", "--device", "cpu"]) == 0
    assert "samples=8 shards=2 skipped/not_t2i=8" in capsys.readouterr().out  # the VQA shard is not DiT data
    shards = sorted(p.name for p in (tmp_path / "pre").iterdir() if p.suffix == ".tar")  # (+ a manifest)
    assert shards == ["dit-000-00000.tar", "dit-000-00001.tar"]

    pre = list(ShardStream(str(tmp_path / "pre" / "*.tar"), shuffle_buffer=1, shuffle_shards=False, repeat=False,
                           processor=DiTProcessor(target="latents", condition="precomputed")))
    raw = list(ShardStream(src[0], shuffle_buffer=1, shuffle_shards=False, repeat=False,
                           processor=DiTProcessor(target_size=16, condition="prompt")))
    assert [i["key"] for i in pre] == [i["key"] for i in raw] and len(pre) == 8
    vae, cond = load_vae(VAEConfig(seed=0)), PromptBytesConditions(COND_DIM, max_length=720)
    for a, b in zip(pre, raw):
        assert a["prompt"] == b["prompt"] and a["cond"].dtype == torch.float16
        latent = vae.encode(vae_pixels(b["pixels"][None]))[0]
        torch.testing.assert_close(a["latents"], latent, atol=2e-3, rtol=2e-3)  # stored as float16
        states, mask = cond({"prompts": [b["prompt"]]})
        torch.testing.assert_close(a["cond"].float(), states[0][mask[0]], atol=2e-3, rtol=2e-3)


def _inputs(synthetic_dir, tmp_path):
    """caption (8 samples), vqa (8, none of them DiT data), caption with its 2nd image undecodable (7)."""
    import io
    import tarfile

    bad = tmp_path / "bad-caption.tar"
    with tarfile.open(synthetic_dir / "caption-00001.tar") as src, tarfile.open(bad, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name == "caption1001x000001.0.jpg":
                data = b"not a jpeg"
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    return [str(synthetic_dir / "caption-00000.tar"), str(synthetic_dir / "vqa-00000.tar"), str(bad)]


def _args(src, out):
    return ["--shards", *src, "--out", str(out), "--tiny-vae-seed", "0", "--smoke-prompt-dim", str(COND_DIM),
            "--target-size", "16", "--batch-size", "3", "--samples-per-shard", "5", "--device", "cpu"]


def _tars(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def test_precompute_writes_a_manifest_with_the_skipped_samples(synthetic_dir, tmp_path):
    import json
    import tarfile

    src = _inputs(synthetic_dir, tmp_path)
    assert main(["precompute-dit", *_args(src, tmp_path / "pre")]) == 0
    m = json.loads((tmp_path / "pre" / "dit-000.manifest.json").read_text())
    # numbering goes on across inputs: caption 5 + 3, vqa nothing, the damaged caption 5 + 2
    assert {n: s["samples"] for n, s in m["shards"].items()} == {
        "dit-000-00000.tar": 5, "dit-000-00001.tar": 3, "dit-000-00002.tar": 5, "dit-000-00003.tar": 2}
    for name, s in m["shards"].items():
        assert s["bytes"] == (tmp_path / "pre" / name).stat().st_size
    assert m["totals"] | {"bytes": 0} == {"samples": 15, "shards": 4, "skipped": 9, "bytes": 0, "resumed_inputs": 0}
    assert m["skipped_by_reason"] == {"corrupt_image": 1, "not_t2i": 8}
    assert [(s["source"], s["key"]) for s in m["skipped"] if s["reason"] == "corrupt_image"] == [
        (src[2], "caption1001x000001")]
    with tarfile.open(src[1]) as t:
        vqa_keys = sorted({n.split(".")[0] for n in t.getnames()})
    assert len(vqa_keys) == 8 and [(s["source"], s["key"]) for s in m["skipped"] if s["reason"] == "not_t2i"] == [
        (src[1], k) for k in vqa_keys]
    pre = ShardStream(str(tmp_path / "pre" / "*.tar"), shuffle_buffer=1, shuffle_shards=False, repeat=False,
                      processor=DiTProcessor(target="latents", condition="precomputed"))
    assert len(list(pre)) == 15  # the shard reader checks the manifest's counts


KILL_IN_THIRD_INPUT = """
import os, signal, sys
import kelix.dit.precompute as p
real, calls = p._precompute_shard, []
def _precompute_shard(*a, **k):
    skipped = real(*a, **k)  # the third input: its first shard renamed, its second still a .tmp
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return skipped
p._precompute_shard = _precompute_shard
from kelix.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_precompute_resumed_gives_the_bytes_of_an_uninterrupted_run(synthetic_dir, tmp_path, monkeypatch):
    import json
    import os
    import subprocess
    import sys

    import kelix.dit.precompute as pre

    src = _inputs(synthetic_dir, tmp_path)
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["precompute-dit", *_args(src, full)]) == 0
    want = _tars(full)
    proc = subprocess.run([sys.executable, "-c", KILL_IN_THIRD_INPUT, "precompute-dit", *_args(src, part)],
                          capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert sorted(_tars(part)) == ["dit-000-00000.tar", "dit-000-00001.tar", "dit-000-00002.tar"]
    assert (part / "dit-000-00003.tar.tmp").exists()
    recs = [json.loads(p.read_text()) for p in sorted(part.glob(".precompute-dit-000/*.json"))]
    assert ["job" in r for r in recs] == [True, True, False]  # the third: the sink's interim count, not a record
    with open(part / "dit-000-00001.tar", "r+b") as f:  # and a finished shard cut short later (a failed copy)
        f.truncate(2000)
    redone, real = [], pre._precompute_shard
    monkeypatch.setattr(pre, "_precompute_shard", lambda url, *a: redone.append(url) or real(url, *a))
    assert main(["precompute-dit", *_args(src, part)]) == 0
    assert redone == [src[0], src[2]]  # the vqa input kept; the caption input with the damaged shard redone
    assert _tars(part) == want
    m, w = (json.loads((d / "dit-000.manifest.json").read_text()) for d in (part, full))
    assert m["totals"].pop("resumed_inputs") == 1 and w["totals"].pop("resumed_inputs") == 0
    assert m == w, [(a, b) for a, b in zip(m["skipped"], w["skipped"]) if a != b]


def test_include_end_needs_the_llm_and_its_markers(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["precompute-dit", "--shards", "x.tar", "--out", str(tmp_path), "--tiny-vae-seed", "0",
              "--smoke-prompt-dim", "8", "--include-end"])
    assert "--include-end needs --lm" in capsys.readouterr().err
