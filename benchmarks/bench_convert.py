"""``kelix convert official`` on a release-shaped layout: peak RSS and seconds (one JSON line).

``--preset release`` builds the real Kelix-SFT shapes (Qwen3-8B LLM, 27 x 1152 ViT, N=8, S=65,536, the
whole centroid table in each of the 8 slots, ~4 GiB bf16 shards; values are zeros: the converter's cost
does not depend on them) at a reduced depth (``--llm-layers``, ``--vit-layers``), converts it in a fresh
process, and extrapolates seconds and peak RSS to the full depth (labelled ``*_extrapolated``).
``--preset tiny`` (the default, what the test suite runs) does the same on a tiny config.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.common import device_info

RELEASE = {  # the official demo config's sizes (docs/official.md); depth set by the options
    "model_class": "KeyeARModel", "__class__": "KeyeARConfig",
    "qwen_config": {
        "model_class": "UnifiedQwen3Model", "vocab_size": 151936, "embed_dim": 4096, "num_layers": 36,
        "tie_word_embeddings": False, "hidden_act": "silu", "num_heads": 32, "num_kv_heads": 8, "head_dim": 128,
        "attn_dropout": 0.0, "attention_function": "flash", "q_proj_bias": False, "k_proj_bias": False,
        "v_proj_bias": False, "attention_bias": False, "intermediate_dim": 12288, "max_seq_len": 40960,
        "rope_base": 1000000.0, "rope_impl": "llama", "rope_theta": 10000.0, "rope_scaling": None,
        "use_sliding_window": False, "sliding_window": None, "norm_eps": 1e-06, "rms_norm_eps": 1e-06,
        "q_norm": True, "k_norm": True, "eos_token_id": 151645, "use_multimodal_rope": False,
        "mrope_section": [16, 24, 24], "pre_embedding_size": None, "pre_embedding_tokens": None,
        "image_token_id": 151655, "pad_token_id": None, "q_eos_token": 151681, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "output_last_hidden_states_only": False,
        "token_decoder_with_teacher_forcing": True, "codebook_size": 65536, "n_q_tokens": 8,
        "skip_output_layer": False},
    "tokenizer_config": {
        "model_class": "KeyeImageTokenizer",
        "vision_config": {
            "model_class": "KeyeVL1_5VisionModel", "image_size": 378, "patch_size": 14, "num_channels": 3,
            "hidden_size": 1152, "num_hidden_layers": 27, "num_attention_heads": 16, "intermediate_size": 4304,
            "hidden_act": "gelu_pytorch_tanh", "max_seq_len": 4096, "layer_norm_eps": 1e-06,
            "attention_dropout": 0.0, "has_learnable_position_embedding": True, "use_qk_norm": False,
            "qk_norm_eps": 1e-06, "rope_theta": 10000.0, "attention_function": "flash", "output_attentions": False,
            "output_hidden_states": False},
        "codebook_size": 65536, "embedding_dim": 128, "init_embedding_dim": 4096, "llm_hidden_size": 4096,
        "n_q_tokens": 8, "split_dim": False, "split_voc": 8, "add_voc_reducer": False, "vq_sampling_mode": "argmin",
        "vq_temperature": 1.0, "vq_temperature_decay": 0.999, "vq_min_temperature": 0.1, "pre_llm_align": False,
        "output_dim": 1024, "fusion_type": "sum"},
    "token_decoder_config": {
        "model_class": "UnifiedTokenDecoder", "vocab_size": 65536, "max_pos_length": 65537, "max_length": 9,
        "d_model": 512, "eos_token": 151681, "nhead": 4, "num_layers": 1, "dim_feedforward": 2048,
        "use_gradient_checkpointing": True, "input_dim": 4096, "reduce": True, "attention_function": "flash"},
}
FIXTURE = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "official", "sft")


def build_layout(config: dict, out: str, shard_bytes: int) -> tuple[int, int]:
    """Write a release-shaped directory (config.json, bf16 zero shards, index, the fixture's tokenizer);
    returns (bytes, tensors)."""
    import shutil

    import torch

    from kelix.official.config import read_release
    from kelix.official.convert import official_shapes
    from kelix.official.io import ShardWriter

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f)
    shapes = official_shapes(read_release(out))
    w = ShardWriter(out, shard_bytes)
    for k, s in shapes.items():
        w.add(k, torch.zeros(s, dtype=torch.bfloat16))
    total = w.close()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(FIXTURE, name), out)
    return total, len(shapes)


CONVERT = """
import json, resource, sys, time
from kelix.official.convert import convert_official
t = time.time()
s = convert_official(sys.argv[1], sys.argv[2], progress=False, shard_bytes=int(sys.argv[3]))
print(json.dumps({"seconds": time.time() - t, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "llm": s["llm"], "tokenizer": s["tokenizer"], "bytes": s["bytes"]}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_convert", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=["tiny", "release"], default="tiny")
    p.add_argument("--llm-layers", type=int, default=2, help="LLM layers built (release: 36)")
    p.add_argument("--vit-layers", type=int, default=2, help="ViT layers built (release: 27)")
    p.add_argument("--shard-gib", type=float, default=4.0, help="shard size of the layout and of the output")
    p.add_argument("--dir", default=None, help="where to build (default: a temporary directory, removed)")
    a = p.parse_args(argv)
    if a.preset == "release":
        config = json.loads(json.dumps(RELEASE))
    else:
        with open(os.path.join(FIXTURE, "config.json")) as f:
            config = json.load(f)
        a.shard_gib = min(a.shard_gib, 1 / 1024)
    full_llm, full_vit = config["qwen_config"]["num_layers"], config["tokenizer_config"]["vision_config"]["num_hidden_layers"]
    config["qwen_config"]["num_layers"] = min(a.llm_layers, full_llm)
    config["tokenizer_config"]["vision_config"]["num_hidden_layers"] = min(a.vit_layers, full_vit)
    shard = int(a.shard_gib * (1 << 30))
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        t = time.time()
        size, n = build_layout(config, os.path.join(tmp, "sft"), shard)
        built = time.time() - t
        r = subprocess.run([sys.executable, "-c", CONVERT, os.path.join(tmp, "sft"), os.path.join(tmp, "out"), str(shard)],
                           capture_output=True, text=True, check=True)
        m = json.loads(r.stdout.strip().splitlines()[-1])
    q, v = config["qwen_config"], config["tokenizer_config"]["vision_config"]
    D, F, H = q["embed_dim"], q["intermediate_dim"], q["head_dim"]
    llm_layer = 2 * (D * q["num_heads"] * H + D * q["num_kv_heads"] * H) + 3 * D * F + 2 * D + 2 * H
    W, Fv = v["hidden_size"], v["intermediate_size"]
    vit_layer = 4 * W * W + 2 * W * Fv + 9 * W + Fv
    extra_llm, extra_vit = (full_llm - q["num_layers"]) * llm_layer, (full_vit - v["num_hidden_layers"]) * vit_layer
    full_bytes = size + 2 * (extra_llm + extra_vit)
    out = {"benchmark": "convert", "preset": a.preset, "llm_layers": q["num_layers"], "vit_layers": v["num_hidden_layers"],
           "release_bytes": size, "tensors": n, "build_seconds": round(built, 2),
           "seconds": round(m["seconds"], 2), "peak_rss_gib": round(m["peak_rss_gib"], 3),
           "shard_gib": a.shard_gib, "written_bytes": m["bytes"],
           "full_release_bytes_extrapolated": full_bytes,
           "seconds_extrapolated": round(m["seconds"] * full_bytes / size, 1),
           # streamed: only the tokenizer's tensors (held until written) grow with depth
           "peak_rss_gib_extrapolated": round(m["peak_rss_gib"] + 2 * extra_vit / 2**30, 3),
           "env": device_info()}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
