"""``kelix precompute-dit``: shards of DiT samples -> shards of pre-computed latents and conditions.

Each input sample a :class:`~kelix.dit.data.DiTProcessor` accepts (inverted caption pair or
text-to-image chat) becomes ``{key}.json`` (the prompt as text ``segments``), ``{key}.latent.npy``
(float16 ``[C, h, w]``: the frozen VAE's scaled latents of the target) and ``{key}.cond.npy`` (float16
``[L, D]``: the condition states, padding removed). The frozen LLM (+ tokenizer for shards without codes)
then runs once per image instead of once per epoch; train on the output with
``DiTProcessor(target: latents, condition: precomputed)`` and ``PrecomputedConditions``
(recipes/dit/pretrain_precomputed.yaml).

The same processor options as the training recipe apply (target and condition sizes, aspect filter,
resize mode). ``--part i/n`` processes every n-th input shard, for one job per GPU.
"""

import argparse
import logging
import os

import torch

log = logging.getLogger("kelix.dit")


def _batches(stream, size: int):
    batch = []
    for item in stream:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def precompute(sources, out_dir: str, processor, vae, condition, batch_size: int = 8, device: str = "cpu",
               samples_per_shard: int = 1000, prefix: str = "dit") -> dict:
    """Write pre-computed shards to ``out_dir``; returns counts (``samples``, ``shards``, skipped per reason)."""
    from kelix.data.stream import ShardStream
    from kelix.data.writer import ShardSink, make_record

    stream = ShardStream(sources, processor=processor, shuffle_buffer=1, shuffle_shards=False, repeat=False)
    vae, condition = vae.to(device), condition.to(device)
    n = 0
    with ShardSink(out_dir, prefix=prefix, max_count=samples_per_shard) as sink:
        for items in _batches(stream, batch_size):
            batch = processor.collate(items)
            latents = vae.encode(batch["pixels"].to(device)).half().cpu().numpy()
            states, mask = condition({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
            states, mask = states.half().cpu(), mask.cpu()
            for i, (key, prompt) in enumerate(zip(batch["keys"], batch["prompts"])):
                meta = {"task": "t2i", "segments": [{"type": "text", "text": prompt}]}
                files = {"latent.npy": latents[i], "cond.npy": states[i][mask[i]].numpy()}
                sink.write(make_record(key, meta, files))
                n += 1
    shards = sink.paths
    skipped = {k: v for k, v in stream.stats.items() if k.startswith("skipped/")}
    return {"samples": n, "shards": len(shards), **skipped}


def main(argv: list[str] | None = None) -> int:
    from kelix.data.shards import Source

    p = argparse.ArgumentParser(prog="kelix precompute-dit", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", nargs="+", required=True, help="input shard patterns (braces, globs)")
    p.add_argument("--out", required=True, help="output directory for {prefix}-NNNNN.tar shards")
    vae = p.add_mutually_exclusive_group(required=True)
    vae.add_argument("--vae", help="local diffusers VAE directory (AutoencoderDC / AutoencoderKL)")
    vae.add_argument("--tiny-vae-seed", type=int, help="the random tiny VAE (kelix.dit.vae.TINY_DCAE) of this seed")
    cond = p.add_mutually_exclusive_group(required=True)
    cond.add_argument("--lm", help="exported Kelix LLM directory (the real condition)")
    cond.add_argument("--smoke-prompt-dim", type=int,
                      help="SMOKE TEST: PromptBytesConditions of this width instead of an LLM")
    p.add_argument("--vae-variant", help="weights variant of --vae (e.g. bf16: diffusion_pytorch_model.bf16.safetensors)")
    p.add_argument("--tokenizer", help="exported Kelix tokenizer directory (for shards without codes; with --lm)")
    p.add_argument("--no-markers", action="store_true", help="condition on the visual blocks only (with --lm)")
    p.add_argument("--target-size", type=int, default=1024)
    p.add_argument("--condition-size", type=int, default=504)
    p.add_argument("--aspect-range", type=float, nargs=2, default=None, metavar=("LO", "HI"))
    p.add_argument("--min-source-side", type=int, default=0)
    p.add_argument("--resize", choices=["resize", "center_crop"], default="resize")
    p.add_argument("--token-size", type=int, default=28,
                   help="pixels per visual token of the tokenizer: pre-tokenized codes must be the "
                        "(condition-size / token-size)^2 grid")
    p.add_argument("--max-condition-length", type=int, default=720)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the frozen VAE and LLM")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--part", default="0/1", help="i/n: process input shards i, i+n, i+2n... (one job per GPU)")
    a = p.parse_args(argv)
    try:
        i, n = (int(x) for x in a.part.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        p.error(f"--part must be i/n with 0 <= i < n, got {a.part!r}")
    if a.tokenizer and not a.lm:
        p.error("--tokenizer needs --lm")

    from kelix.dit.conditions import LLMConditions, PromptBytesConditions
    from kelix.dit.data import DiTProcessor
    from kelix.dit.vae import VAEConfig, load_vae

    urls = Source(a.shards).expand()[i::n]
    if not urls:
        p.error(f"part {a.part} has no input shard ({len(Source(a.shards).expand())} in all)")
    processor = DiTProcessor(a.target_size, a.condition_size, a.aspect_range, a.min_source_side, a.resize,
                             target="pixels", condition="llm" if a.lm else "prompt",
                             max_condition_length=a.max_condition_length, token_size=a.token_size)
    vae = load_vae(VAEConfig(path=a.vae, dtype=a.dtype, variant=a.vae_variant) if a.vae else VAEConfig(seed=a.tiny_vae_seed))
    if a.lm:
        condition = LLMConditions(a.lm, a.tokenizer, include_markers=not a.no_markers, dtype=a.dtype)
    else:
        condition = PromptBytesConditions(a.smoke_prompt_dim, max_length=a.max_condition_length)
    os.makedirs(a.out, exist_ok=True)
    counts = precompute(Source(urls), a.out, processor, vae, condition, a.batch_size, a.device, a.samples_per_shard,
                        prefix=f"dit-{i:03d}")
    print(" ".join(f"{k}={v}" for k, v in counts.items()), f"-> {a.out}")
    return 0
