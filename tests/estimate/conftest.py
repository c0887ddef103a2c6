"""A stand-in for ``kelix convert official`` output with config files only (no weights): the estimate reads
nothing else. The LLM's and tokenizer's configs are the converter's own for the release's config (a Qwen3-8B
backbone with 151,936 text + 65,536 visual rows, N=8, K=8192, the release's block decoder, the 27 x 1152
Keye NaViT); the DiT is SANA-1.6B with DC-AE f32c32."""

from __future__ import annotations

import json
import os

import pytest

QWEN3_8B = dict(model_type="qwen3", vocab_size=151936 + 8 * 8192, hidden_size=4096, intermediate_size=12288,
                num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                max_position_embeddings=40960, rope_theta=1e6, tie_word_embeddings=False)
LLM = dict(N=8, K=8192, visual_input="table", predictor="block_decoder", decoder_width=512, decoder_layers=1,
           decoder_heads=4, decoder_ffn=2048, visual_offset=151936)


def _write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def write_release(root) -> str:
    """``root/exports/kelix/{llm,tokenizer,dit}`` config files, as ``kelix convert official`` writes them for the
    release's config (benchmarks/bench_convert.py's ``RELEASE``); returns ``root``."""
    import dataclasses

    from benchmarks.bench_convert import RELEASE
    from kelix.llm.config import LLMConfig
    from kelix.official.config import read_release
    from kelix.tokenizer.model import TokenizerConfig

    out = os.path.join(str(root), "exports", "kelix")
    _write(os.path.join(out, "sft", "config.json"), RELEASE)
    rel = read_release(os.path.join(out, "sft"))
    _write(os.path.join(out, "llm", "config.json"), dataclasses.asdict(LLMConfig(**rel.llm_config("{row},{cols}"))))
    _write(os.path.join(out, "llm", "backbone", "config.json"),
           {**rel.backbone_config(), "architectures": ["Qwen3ForCausalLM"]})
    _write(os.path.join(out, "tokenizer", "config.json"), dataclasses.asdict(TokenizerConfig(**rel.tokenizer_config())))
    _write(os.path.join(out, "dit", "vae", "config.json"), DCAE_F32C32)
    return str(root)


# diffusers' AutoencoderDC f32c32 (SANA's VAE) config
DCAE_F32C32 = {
    "_class_name": "AutoencoderDC", "in_channels": 3, "latent_channels": 32,
    "attention_head_dim": 32,
    "encoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock", "EfficientViTBlock"],
    "decoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock", "EfficientViTBlock"],
    "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "encoder_layers_per_block": [2, 2, 2, 3, 3, 3], "decoder_layers_per_block": [3, 3, 3, 3, 3, 3],
    "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]], "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "upsample_block_type": "interpolate", "downsample_block_type": "Conv", "decoder_norm_types": "rms_norm",
    "decoder_act_fns": "silu", "scaling_factor": 0.41407,
}


@pytest.fixture
def release(tmp_path, monkeypatch):
    """A working directory holding the stand-in release under exports/kelix/ (the official recipes' paths)."""
    write_release(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path
