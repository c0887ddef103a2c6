"""A converted release is a kit pipeline: KelixPipeline, kelix chat, kelix eval run and init_from all take it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from kelix.cli import main


@pytest.fixture(scope="module")
def image_file(tmp_path_factory, reference):
    meta, _ = reference
    img = meta["tokenizer"]["image"]
    rng = np.random.RandomState(3)
    path = tmp_path_factory.mktemp("img") / "x.png"
    Image.fromarray((rng.rand(img["height"], img["width"], 3) * 255).astype("uint8")).save(path)
    return path


def test_pipeline_config_and_chat(converted, image_file, capsys):
    from kelix.pipeline import KelixPipeline

    pipe = KelixPipeline.from_pretrained(str(converted), dit=False)
    cfg = json.loads((converted / "official.json").read_text())["release_config"]
    assert pipe.lm.config.decoder_kind == "release"
    assert pipe.lm.vocab.eob == cfg["qwen_config"]["q_eos_token"]
    assert pipe.lm.vocab.visual_offset == cfg["qwen_config"]["vocab_size"]
    assert len(pipe.lm.text_tokenizer) <= pipe.lm.vocab.visual_offset  # no new token row: q_eos is the eob
    img = Image.open(image_file).convert("RGB")
    want = pipe.understand(img, "t11 t12", max_new_tokens=4)
    capsys.readouterr()
    assert main(["chat", "--pipeline", str(converted), "--image", str(image_file), "--max-new-tokens", "4",
                 "t11 t12"]) == 0
    assert capsys.readouterr().out.strip() == want.strip()
    assert want.strip()


def test_eval_run_takes_the_converted_pipeline(converted, tmp_path):
    from kelix.eval.synthetic import write_benchmark

    write_benchmark("synthetic-ocr", str(tmp_path / "bench"), n=3)
    out = tmp_path / "run"
    assert main(["eval", "run", "--pipeline", str(converted), "--benchmark", "synthetic-ocr", "--data",
                 str(tmp_path / "bench"), "--limit", "2", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and (out / "scores.json").is_file()


def test_llm_recipe_init_from_the_pipeline_directory(converted):
    from kelix.llm.model import KelixLM
    from kelix.llm.module import UnifiedLLMModule

    module = UnifiedLLMModule(init_from=str(converted))
    ref = KelixLM.from_pretrained(str(converted / "llm"))
    got, want = module.lm.state_dict(), ref.state_dict()
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k].float(), want[k].float()) for k in want)
    assert module.lm.config.decoder_kind == "release"


@pytest.fixture(scope="module")
def full_pipeline(fixture_dir, tmp_path_factory):
    """SFT + DiT + a tiny DC-AE with the DiT's latent channels, converted through the CLI."""
    from kelix.dit.export import save_vae
    from kelix.dit.vae import VAEConfig, load_vae

    root = tmp_path_factory.mktemp("full")
    channels = json.loads((fixture_dir / "dit" / "config.json").read_text())["in_channels"]
    save_vae(load_vae(VAEConfig(config={**VAEConfig().config, "latent_channels": channels})), str(root / "vae"))
    assert main(["convert", "official", "--sft", str(fixture_dir / "sft"), "--dit", str(fixture_dir / "dit"),
                 "--vae", str(root / "vae"), "--out", str(root / "pipe"), "--dtype", "fp32"]) == 0
    return root


def test_generate_with_the_release_settings(full_pipeline, tmp_path, capsys):
    from kelix.pipeline import KelixPipeline

    pipe = KelixPipeline.from_pretrained(str(full_pipeline / "pipe"))
    c = pipe.config
    assert (c.steps, c.dit_cfg_scale, c.dit_sigma_schedule, c.condition_include_end) == (50, 1.0, "linspace", True)
    out = tmp_path / "x.png"
    assert main(["generate", "--pipeline", str(full_pipeline / "pipe"), "--size", "32", "--steps", "2",
                 "--temperature", "0", "--out", str(out), "a prompt"]) == 0
    assert Image.open(out).size == (32, 32)


def test_dit_round_trip_through_the_pipeline(full_pipeline, fixture_dir, tmp_path):
    from safetensors.torch import load_file

    assert main(["convert", "to-official", "--pipeline", str(full_pipeline / "pipe"), "--out", str(tmp_path / "sft"),
                 "--dit-out", str(tmp_path / "dit")]) == 0
    orig, back = load_file(fixture_dir / "dit" / "model.safetensors"), load_file(tmp_path / "dit" / "model.safetensors")
    assert sorted(orig) == sorted(back)
    unused = {"pos_embed"}  # never read without use_pe (kelix.official.dit)
    for k, v in orig.items():
        assert back[k].shape == v.shape, k
        if k not in unused:
            assert torch.equal(back[k], v), k


def test_dit_without_vae_refused(fixture_dir, tmp_path, capsys):
    assert main(["convert", "official", "--sft", str(fixture_dir / "sft"), "--dit", str(fixture_dir / "dit"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "--vae" in capsys.readouterr().err
