"""Unified LLM: next-block-prediction training step (tokens/s, MFU on unpacked rows; packed rows are
``bench_mfu``), slot-restricted vs full-vocabulary heads, and KV-cached vs uncached image generation.

``--scale tiny`` (default on CPU) or ``0.6b`` / ``1.7b`` (Qwen3-sized random backbones, default 0.6b on a GPU).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import report, time_train_step, timeit
from kelix.hf import TINY_QWEN3

QWEN3 = {
    "0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                 rope_theta=1e6, tie_word_embeddings=True),
    "1.7b": dict(model_type="qwen3", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                 rope_theta=1e6, tie_word_embeddings=True),
    "8b": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
               rope_theta=1e6, tie_word_embeddings=False),
    "tiny": TINY_QWEN3,
}


def make_lm(scale: str, device):
    """The benchmarks' unified LLM at a Qwen3 size: N=8, K=8192 (tiny: N=4, K=64 and a small decoder)."""
    from kelix.llm.config import LLMConfig
    from kelix.llm.model import KelixLM

    big = scale != "tiny"
    return KelixLM(LLMConfig(backbone_config=QWEN3[scale], text_tokenizer="builtin:bytes", N=8 if big else 4,
                             K=8192 if big else 64, visual_input="table", attn_implementation="sdpa",
                             **({} if big else dict(decoder_width=64, decoder_heads=2, decoder_ffn=128)))).to(device)


def make_batch(lm, rows: int, length: int, visual_frac: float, device):
    g = torch.Generator().manual_seed(0)
    v = lm.vocab
    tokens = torch.randint(0, min(v.visual_offset, 30000), (rows, length), generator=g)
    is_vis = torch.rand(rows, length, generator=g) < visual_frac
    tokens[is_vis] = -1
    codes = torch.randint(0, v.K, (rows, length, v.N), generator=g)
    codes[~is_vis] = -1
    targets = torch.ones(rows, length, dtype=torch.bool)
    targets[:, 0] = False
    pos = torch.arange(length).expand(rows, -1).contiguous()
    return [t.to(device) for t in (tokens, codes, pos, targets)]


def main(argv=None):
    from kelix.llm.generate import Sampling, generate_image
    from kelix.llm.loss import nbp_loss
    from kelix.training.callbacks import peak_flops

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser()
    p.add_argument("--scale", choices=[k for k in QWEN3 if k != "8b"], default="0.6b" if cuda else "tiny")
    p.add_argument("--rows", type=int, default=4 if cuda else 2)
    p.add_argument("--length", type=int, default=4096 if cuda else 256)
    p.add_argument("--visual-frac", type=float, default=0.5)
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each backbone layer")
    p.add_argument("--grid", type=int, default=8 if cuda else 3, help="side of the generated image's block grid")
    p.add_argument("--skip", nargs="*", default=[], choices=["heads", "attention", "generate"])
    a = p.parse_args(argv)
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    lm = make_lm(a.scale, device)
    if a.activation_checkpointing:
        from kelix.training.parallel import apply_activation_checkpointing

        apply_activation_checkpointing(lm, lm.blocks())
    opt = torch.optim.AdamW([q for q in lm.parameters() if q.requires_grad], lr=1e-5, fused=cuda)
    batch = make_batch(lm, a.rows, a.length, a.visual_frac, device)
    dtype = torch.bfloat16 if cuda else torch.float32

    def loss():
        with torch.autocast(device, dtype=dtype, enabled=cuda):
            return nbp_loss(lm(*batch), lm.vocab.N)["loss"]

    t = time_train_step(loss, opt, repeat=5 if cuda else 2)
    blocks = a.rows * a.length
    res = {"scale": a.scale, "activation_checkpointing": a.activation_checkpointing, "rows": a.rows,
           "blocks_per_row": a.length, "N": lm.vocab.N, "K": lm.vocab.K,
           "params_m": round(sum(q.numel() for q in lm.parameters()) / 1e6, 1),
           "train_step_s": round(t, 4), "blocks_per_s": round(blocks / t, 1)}
    peak = peak_flops(torch.device(device), torch.bfloat16)
    if peak:  # one document per row (see bench_mfu for packed rows)
        res["mfu"] = round(lm.train_flops(a.rows, a.length, visual_blocks=int((batch[0] < 0).sum())) / t / peak, 3)
        res["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)

    # slot-restricted heads (K rows per code slot) vs a full-vocabulary head for every slot
    if "heads" not in a.skip:
        lm.eval()
        P = 2048 if cuda else 64
        out = torch.randn(P, lm.hidden_size, device=device, dtype=dtype)
        head = lm.lm_head.weight

        def restricted():
            return [lm.slot_logits(out, j, "visual") for j in range(lm.vocab.N)]

        def full():
            return [torch.nn.functional.linear(lm.final_norm(out), head) for _ in range(lm.vocab.N)]

        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=cuda):
            res["visual_slot_heads_restricted_s"] = round(timeit(restricted), 5)
            res["visual_slot_heads_full_vocab_s"] = round(timeit(full), 5)
            res["head_rows_restricted_vs_full"] = f"{lm.vocab.K} vs {head.shape[0]}"

    # attention kernels behind SDPA at the backbone's shape (flash attention is PyTorch's own on Hopper)
    if cuda and "attention" not in a.skip:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        cfg = lm.backbone.config
        q = torch.randn(a.rows, cfg.num_attention_heads, a.length, cfg.head_dim, device=device, dtype=dtype,
                        requires_grad=True)
        kv = [torch.randn_like(q, requires_grad=True) for _ in range(2)]
        for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                   SDPBackend.MATH):
            def attn(be=be):
                with sdpa_kernel(be):
                    torch.nn.functional.scaled_dot_product_attention(q, *kv, is_causal=True).sum().backward()
            try:
                res[f"sdpa_fwd_bwd_{be.name.lower()}_s"] = round(timeit(attn), 5)
            except RuntimeError as e:  # a backend that does not support this shape/dtype here
                res[f"sdpa_fwd_bwd_{be.name.lower()}_s"] = f"unavailable: {str(e).splitlines()[0][:80]}"

    # image generation: KV caches on vs recomputing the prefix every block
    if "generate" not in a.skip:
        grid = (a.grid, a.grid)
        with torch.autocast(device, dtype=dtype, enabled=cuda):
            for name, kw in (("cached", {}), ("uncached", dict(use_cache=False, decoder_cache=False))):
                gt = timeit(lambda kw=kw: generate_image(lm, ["a red circle"] * 4, grid, Sampling(seed=0), **kw),
                            warmup=1, repeat=2)
                res[f"generate_{grid[0]}x{grid[1]}_{name}_s"] = round(gt, 3)

    return report("llm", **res)


if __name__ == "__main__":
    main()
