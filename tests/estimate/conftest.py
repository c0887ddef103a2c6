"""A stand-in for ``kelix convert official`` output with config files only (no weights): the estimate reads
nothing else. Sizes are the release's: a Qwen3-8B backbone with 151,936 text + 65,536 visual rows, N=8,
K=8192, a width-512 block decoder; a 0.69B-parameter ViT tokenizer; the SANA-1.6B DiT with DC-AE f32c32."""

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
    """``root/exports/kelix/{llm,tokenizer,dit}`` config files; returns ``root``."""
    import dataclasses

    from kelix.data.images import ImageConfig
    from kelix.tokenizer.encoder import EncoderConfig
    from kelix.tokenizer.model import TokenizerConfig

    out = os.path.join(str(root), "exports", "kelix")
    _write(os.path.join(out, "llm", "config.json"), LLM)
    _write(os.path.join(out, "llm", "backbone", "config.json"), {**QWEN3_8B, "architectures": ["Qwen3ForCausalLM"]})
    tok = TokenizerConfig(codebook_form="table", out_dim=4096, image=ImageConfig(patch_size=14, merge_size=2),
                          encoder=EncoderConfig(kwargs=dict(embed_dim=1280, depth=32, num_heads=16, patch_size=14)))
    _write(os.path.join(out, "tokenizer", "config.json"), dataclasses.asdict(tok))
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
