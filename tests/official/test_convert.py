"""kelix convert official / to-official: strict refusals, one read per tensor, and the byte-exact round trip."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from kelix.official.config import ReleaseError
from kelix.official.convert import convert_official
from kelix.official.io import shard_files
from kelix.official.keys import DROPPED, POSITIONS
from kelix.official.to_official import to_official


def _release_tensors(d):
    files, _ = shard_files(str(d))
    out = {}
    for f in files:
        out.update(load_file(str(d / f)))
    return out


def _rewrite(src, dst, edit):
    """Copy a release directory, with its tensors passed through ``edit(dict) -> dict`` (one shard + index)."""
    shutil.copytree(src, dst)
    sd = edit(_release_tensors(src))
    for f in shard_files(str(dst))[0]:
        (dst / f).unlink()
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": dict.fromkeys(sd, "model-00001-of-00001.safetensors")}))
    save_file(sd, str(dst / "model-00001-of-00001.safetensors"))
    return dst


def _convert_err(sft, tmp_path):
    with pytest.raises(ReleaseError) as e:
        convert_official(str(sft), str(tmp_path / "out"), progress=False)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_key_refused_by_name(fixture_dir, tmp_path):
    key = "model.model.layers.0.mlp.w3.weight"
    sft = _rewrite(fixture_dir / "sft", tmp_path / "sft", lambda sd: {k: v for k, v in sd.items() if k != key})
    msg = _convert_err(sft, tmp_path)
    assert "missing key" in msg and key in msg
    assert not (tmp_path / "out" / "llm" / "backbone").exists()  # refused before any writing


def test_missing_slot_piece_refused_by_name(fixture_dir, tmp_path):
    key = "visual_tokenizer.quantizer.1.q_norm.bias"
    sft = _rewrite(fixture_dir / "sft", tmp_path / "sft", lambda sd: {k: v for k, v in sd.items() if k != key})
    msg = _convert_err(sft, tmp_path)
    assert key in msg


def test_unexpected_key_refused_by_name(fixture_dir, tmp_path):
    key = "model.model.layers.0.attn.extra_proj.weight"
    sft = _rewrite(fixture_dir / "sft", tmp_path / "sft", lambda sd: {**sd, key: torch.zeros(2, 2)})
    msg = _convert_err(sft, tmp_path)
    assert "unexpected key" in msg and key in msg


def test_extra_layer_refused(fixture_dir, tmp_path):
    cfg = json.loads((fixture_dir / "sft" / "config.json").read_text())
    extra = f"model.model.layers.{cfg['qwen_config']['num_layers']}.mlp.w1.weight"
    sft = _rewrite(fixture_dir / "sft", tmp_path / "sft", lambda sd: {**sd, extra: sd["model.model.layers.0.mlp.w1.weight"].clone()})
    assert extra in _convert_err(sft, tmp_path)


def test_wrong_shape_refused(fixture_dir, tmp_path):
    key = "visual_tokenizer.mlp_AR.pre_norm.weight"
    sft = _rewrite(fixture_dir / "sft", tmp_path / "sft", lambda sd: {**sd, key: sd[key][:-1]})
    msg = _convert_err(sft, tmp_path)
    assert key in msg and "shape" in msg


def test_unknown_config_field_refused(fixture_dir, tmp_path):
    sft = tmp_path / "sft"
    shutil.copytree(fixture_dir / "sft", sft)
    cfg = json.loads((sft / "config.json").read_text())
    cfg["token_decoder_config"]["use_rope"] = True
    (sft / "config.json").write_text(json.dumps(cfg))
    assert "token_decoder_config.use_rope" in _convert_err(sft, tmp_path)


def test_unsupported_config_value_refused(fixture_dir, tmp_path):
    sft = tmp_path / "sft"
    shutil.copytree(fixture_dir / "sft", sft)
    cfg = json.loads((sft / "config.json").read_text())
    cfg["tokenizer_config"]["split_dim"] = True
    (sft / "config.json").write_text(json.dumps(cfg))
    assert "split_dim" in _convert_err(sft, tmp_path)


def test_cli_error_is_one_line(fixture_dir, tmp_path):
    key = "model.model.norm.scale"
    sft = _rewrite(fixture_dir / "sft", tmp_path / "sft", lambda sd: {k: v for k, v in sd.items() if k != key})
    r = subprocess.run([sys.executable, "-m", "kelix.cli", "convert", "official", "--sft", str(sft), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and key in r.stderr and "Traceback" not in r.stderr


def test_each_tensor_read_once(fixture_dir, tmp_path, monkeypatch):
    """Streaming: every release tensor is read from disk once, never the model twice."""
    import safetensors

    reads = []
    real = safetensors.safe_open

    class Counting:
        def __init__(self, *a, **k):
            self._f = real(*a, **k)

        def __enter__(self):
            self._f.__enter__()
            return self

        def __exit__(self, *a):
            return self._f.__exit__(*a)

        def get_tensor(self, k):
            reads.append(k)
            return self._f.get_tensor(k)

        def __getattr__(self, n):
            return getattr(self._f, n)

    monkeypatch.setattr(safetensors, "safe_open", Counting)
    convert_official(str(fixture_dir / "sft"), str(tmp_path / "out"), progress=False)
    n_release = len(shard_files(str(fixture_dir / "sft"))[1])
    assert len(reads) == len(set(reads)) <= n_release


def test_round_trip_is_byte_identical(fixture_dir, converted, tmp_path):
    cfg = json.loads((fixture_dir / "sft" / "config.json").read_text())
    N, S = cfg["qwen_config"]["n_q_tokens"], cfg["qwen_config"]["codebook_size"]
    K = S // N
    out = tmp_path / "official"
    to_official(str(converted), str(out), shard_bytes=1 << 20, progress=False)  # several shards
    assert len(shard_files(str(out))[0]) > 1
    orig, back = _release_tensors(fixture_dir / "sft"), _release_tensors(out)
    assert sorted(back) == sorted(orig)  # every key the official loader wants, nothing else
    slots = N + 1
    for k, v in orig.items():
        w = back[k]
        assert w.shape == v.shape and w.dtype == v.dtype, k
        if k in DROPPED:
            continue
        if ".quantizer." in k and k.endswith("embedding.weight"):
            j = int(k.split(".quantizer.")[1].split(".")[0])
            assert torch.equal(w[j * K:(j + 1) * K], v[j * K:(j + 1) * K]), k  # slot j's own rows, exactly
            continue
        if k == POSITIONS[0]:
            assert torch.equal(w[:slots], v[:slots]) and not w[slots:].any(), k
            continue
        assert torch.equal(w, v), k
    assert torch.equal(back["lm_head.weight"], orig["model.model.output.weight"])
    assert json.loads((out / "config.json").read_text()) == cfg


def test_to_official_refuses_a_kit_native_pipeline(tmp_path):
    (tmp_path / "p").mkdir()
    with pytest.raises(ReleaseError, match="official.json"):
        to_official(str(tmp_path / "p"), str(tmp_path / "o"), progress=False)


def test_layout_derived_from_config_is_the_release_table(fixture_dir, reference):
    """The key/shape table the converter expects, derived from config.json alone, is the release's
    (reference.json's table, which the official code wrote)."""
    from kelix.official.config import read_release
    from kelix.official.convert import official_shapes

    meta, _ = reference
    rel = read_release(str(fixture_dir / "sft"))
    want = {k: tuple(v["shape"]) for k, v in meta["state_dict"].items()}
    packing = want["visual_tokenizer.visual.embeddings.packing_position_embedding.weight"][0]
    assert official_shapes(rel, packing_rows=packing) == want
