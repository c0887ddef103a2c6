"""``kelix estimate``: exact parameter counts against the instantiated modules, memory against measurement
(tiny CPU steps here, the H100 numbers of docs/testing.md), and the fit verdict with its knobs."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from kelix.estimate.cli import estimate, main
from kelix.estimate.memory import GIB, LLMRun, decoder_layer_bytes, llm_memory, saved_bytes
from kelix.estimate.models import Part, meta_llm
from kelix.estimate.recipe import RunShape
from kelix.hf import TINY_QWEN3

TINY_LM = dict(backbone_config=TINY_QWEN3, text_tokenizer="builtin:bytes", N=4, K=32, visual_input="table",
               decoder_width=32, decoder_heads=2, decoder_ffn=64)


def _recipe(tmp_path, **init_args) -> str:
    recipe = {"trainer": {"devices": 1, "precision": "32", "max_steps": 10},
              "model": {"class_path": "kelix.llm.module.UnifiedLLMModule", "init_args": {"lm": TINY_LM, **init_args}},
              "data": {"init_args": {"batch_size": 2, "processor": {"init_args": {"max_blocks": 64}}}}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.mark.parametrize("init_args", [
    {},
    {"freeze_backbone": True, "freeze_lm_head": True},
    {"lora": {"r": 4, "train_visual_head": True, "target_modules": ["q_proj", "v_proj", "down_proj"]}},
    {"lora": {"r": 2, "train_decoder": False, "train_embeddings": True}},
], ids=["full", "stage1_frozen", "lora_head", "lora_embeddings"])
def test_parameter_counts_equal_the_instantiated_module(tmp_path, init_args):
    from kelix.llm.model import LLMConfig
    from kelix.llm.module import UnifiedLLMModule
    from kelix.lora import LoRAConfig

    est = estimate([_recipe(tmp_path, **init_args)])
    args = copy.deepcopy(init_args)
    if "lora" in args:
        args["lora"] = LoRAConfig(**args["lora"])
    m = UnifiedLLMModule(LLMConfig(**TINY_LM), **args)
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in m.parameters() if not p.requires_grad)
    assert (sum(p.trainable for p in est.parts), sum(p.frozen for p in est.parts)) == (trainable, frozen)
    parts = {p.name: p for p in est.parts}
    assert parts["block decoder"].trainable + parts["block decoder"].frozen == sum(p.numel() for p in m.lm.decoder.parameters())


def test_the_dit_parts_count_exactly(tmp_path):
    from kelix.dit.model import DiTConfig, KelixDiT
    from kelix.estimate.models import dit_parts

    tiny = dict(cond_dim=64, transformer=dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                               num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=16,
                                               cross_attention_dim=32, caption_channels=32, sample_size=8))
    parts, _ = dit_parts({"dit": tiny, "vae": {"kind": "pixel"}})
    n = sum(p.numel() for p in KelixDiT(DiTConfig(**copy.deepcopy(tiny))).parameters())
    by = {p.name: p for p in parts}
    assert by["DiT transformer"].trainable + by["connector + null condition"].trainable == n
    assert by["EMA of the DiT (frozen)"].frozen == n


def test_decoder_layer_bytes_count_what_a_qwen3_layer_saves():
    """The per-token formula against a saved-tensor hook on a real transformers layer (fp32, trainable or
    frozen), every storage counted once."""
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RotaryEmbedding

    cfg = Qwen3Config(hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    cfg._attn_implementation = "sdpa"
    layer, rope = Qwen3DecoderLayer(cfg, 0), Qwen3RotaryEmbedding(cfg)
    T = 256
    x = torch.randn(1, T, 128, requires_grad=True)
    pos = rope(x, torch.arange(T)[None])
    for trainable in (True, False):
        layer.requires_grad_(trainable)
        got = saved_bytes(lambda: layer(x, position_embeddings=pos, attention_mask=None), list(layer.parameters())) / T
        want = decoder_layer_bytes(128, 128, 64, 384, 4, 4, 4, trainable)
        assert abs(got - want) / got < 0.10, (trainable, got, want)


def test_a_too_large_run_is_refused_and_the_knobs_named(tmp_path, capsys):
    big = dict(TINY_LM, backbone_config=dict(TINY_QWEN3, hidden_size=256, intermediate_size=1024, num_hidden_layers=8))
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump({
        "trainer": {"devices": 1, "precision": "bf16-mixed", "max_steps": 10},
        "model": {"class_path": "kelix.llm.module.UnifiedLLMModule", "init_args": {"lm": big}},
        "data": {"init_args": {"batch_size": 8, "processor": {"init_args": {"max_blocks": 4096}}}}}))
    est = estimate([str(path)], gpu_mem=2.0)
    assert not est.fits and est.memory.total > est.other.total
    knobs = dict(est.knobs)
    assert "model.init_args.activation_checkpointing: true" in knobs
    assert any(k.startswith("data.init_args.batch_size: ") and "accumulate_grad_batches" in k for k in knobs)
    assert all(g <= est.usable for g in knobs.values())
    assert main(["--config", str(path), "--gpu-mem", "2"]) == 1
    out = capsys.readouterr().out
    assert "does not fit" in out and "model.init_args.activation_checkpointing: true" in out
    assert main(["--config", str(path), "--gpu-mem", "80"]) == 0
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


# the H100 measurements of docs/testing.md's benchmark table (bench_llm: a bare KelixLM, bf16 autocast, fused AdamW)
MEASURED_H100 = [("0.6b", 4, False, 54.0), ("1.7b", 2, False, 64.8), ("1.7b", 2, True, 36.5)]


@pytest.mark.parametrize("scale,rows,ckpt,gib", MEASURED_H100)
def test_the_estimate_is_within_25_percent_of_the_measured_h100_peaks(scale, rows, ckpt, gib):
    from benchmarks.bench_llm import QWEN3

    lm = meta_llm(dict(N=8, K=8192, visual_input="table"), QWEN3[scale], "builtin:bytes")
    mem = llm_memory(lm, [Part("all", list(lm.parameters()))], RunShape(1, "single", "bf16-mixed", rows, 4096, 1, 1),
                     LLMRun(ckpt, None, visual_frac=0.5, fused_optimizer=True))
    assert abs(mem.total / GIB - gib) / gib < 0.25
