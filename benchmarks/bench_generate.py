"""Image generation: blocks/s of the eager KV-cached path (transformers' DynamicCache, a forward per
block and per decoder slot) against the fast path (:mod:`kelix.llm.fast_generate`: static caches,
fixed-shape steps, CUDA graphs on a GPU), and whether the fast path's greedy codes equal the eager's.

GPU defaults: a Qwen3-0.6B-sized random LLM in bf16 (N=8, K=8192), 4 images of 18x18 blocks (a 504 px
image at 28 px per block), beside LlamaGen's published vLLM figure. CPU defaults: the tiny Qwen3, 2
images of 6x6 blocks. Weights are random; the LM head's visual rows and the block decoder's output
projection are redrawn with spread (at init they are near-constant: argmax ties would make
``codes_equal`` a coin toss). ``codes_equal`` is checked greedy in float32 (CFG off and on) on a grid
of at most ``--check-grid`` rows and columns.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import report, timeit

# LlamaGen (Sun et al. 2024), README: GPT-L, 8 class-conditional 384 px images with CFG, vLLM on an A100
LLAMAGEN_VLLM = dict(model="GPT-L (343M)", images=8, px=384, tokens_per_image=576, cfg=True, gpu="A100",
                     seconds=3.48, seconds_per_image=round(3.48 / 8, 3))


@torch.no_grad()
def spread_heads(lm, seed: int = 0):
    """Visual LM-head rows as distinct as text rows, a block decoder that is not the identity."""
    g = torch.Generator().manual_seed(seed)
    head, vo = lm.lm_head.weight, lm.vocab.visual_offset
    text = head[:vo].float()
    new = text.mean(0) + text.std(0) * torch.randn(head.shape[0] - vo, head.shape[1], generator=g)
    head[vo:] = new.to(head.device, head.dtype)
    out = getattr(lm.decoder, "proj_out", None)
    if out is not None:
        out.weight.copy_(torch.randn(out.weight.shape, generator=g).to(out.weight) * 0.02)


def interleaved(fns: dict, repeat: int) -> dict:
    """Median seconds of each function, run in turns (a shared machine's load drifts alike for all)."""
    for fn in fns.values():
        fn()  # warm-up
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            times[k].append(timeit(fn, warmup=0, repeat=1))
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def main(argv=None):
    from benchmarks.bench_llm import QWEN3, make_lm
    from kelix.llm.fast_generate import fast_generate_image
    from kelix.llm.generate import Sampling, generate_image

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser()
    p.add_argument("--scale", choices=list(QWEN3), default="0.6b" if cuda else "tiny")
    p.add_argument("--images", type=int, default=4 if cuda else 2)
    p.add_argument("--grid", type=int, default=18 if cuda else 6, help="side of each image's block grid")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="LLM guidance of the timed runs (1: none)")
    p.add_argument("--guided-cfg", type=float, default=4.0, help="guidance of the extra fast run (LlamaGen's 4)")
    p.add_argument("--check-grid", type=int, default=6, help="largest grid side of the codes_equal check")
    p.add_argument("--repeat", type=int, default=3 if cuda else 5, help="timed runs of each (1 eager run at 0.6b+)")
    p.add_argument("--prompt", default="a red circle on a white background")
    a = p.parse_args(argv)
    device = "cuda" if cuda else "cpu"
    big = a.scale != "tiny"
    torch.manual_seed(0)
    lm = make_lm(a.scale, device)
    spread_heads(lm)
    lm.eval()
    prompts, grid = [a.prompt] * a.images, (a.grid, a.grid)

    # greedy codes, float32 (bf16 rounding makes near-ties of random weights flip between kernels)
    check = (min(a.grid, a.check_grid),) * 2
    equal = []
    for cfg in (1.0, a.guided_cfg):
        s = Sampling(temperature=0.0, cfg_scale=cfg)
        eager = generate_image(lm, prompts[:2], check, s)[0]
        equal.append(bool(torch.equal(eager, generate_image(lm, prompts[:2], check, s, fast=True)[0])))

    dtype = torch.bfloat16 if cuda else torch.float32
    lm.to(dtype)
    s = Sampling(seed=0, cfg_scale=a.cfg_scale)
    blocks = a.images * a.grid * a.grid
    first = timeit(lambda: fast_generate_image(lm, prompts, grid, s), warmup=0, repeat=1)  # + graph capture
    guided = Sampling(seed=0, cfg_scale=a.guided_cfg)
    runs = {"eager": lambda: generate_image(lm, prompts, grid, s),
            "fast": lambda: fast_generate_image(lm, prompts, grid, s),
            "fast_cfg": lambda: fast_generate_image(lm, prompts, grid, guided)}
    eager, fast, fast_cfg = interleaved(runs, 1 if big else a.repeat).values()
    ratio = round(eager / fast, 2)
    res = {"device": device, "torch": torch.__version__, "scale": a.scale, "dtype": str(dtype).replace("torch.", ""),
           "params_m": round(sum(q.numel() for q in lm.parameters()) / 1e6, 1), "N": lm.vocab.N, "K": lm.vocab.K,
           "images": a.images, "grid": list(grid), "blocks_per_image": a.grid * a.grid, "cfg_scale": a.cfg_scale,
           "graphs": cuda, "eager_s": round(eager, 4), "fast_s": round(fast, 4),
           "fast_first_call_s": round(first, 4),
           "eager_blocks_per_s": round(blocks / eager, 1), "fast_blocks_per_s": round(blocks / fast, 1),
           "fast_over_eager": ratio if cuda else None, "fast_over_eager_cpu": None if cuda else ratio,
           "codes_equal": all(equal),
           "codes_equal_check": {"grid": list(check), "images": 2, "dtype": "float32", "sampling": "greedy",
                                 "cfg_scales": [1.0, a.guided_cfg]},
           "s_per_image_eager": round(eager / a.images, 4), "s_per_image_fast": round(fast / a.images, 4),
           f"s_per_image_fast_cfg{a.guided_cfg:g}": round(fast_cfg / a.images, 4),
           "reference_llamagen_vllm": LLAMAGEN_VLLM}
    if not cuda:
        res["to_measure_on_gpu"] = ["fast_over_eager", "s_per_image_fast at 0.6b, 18x18 blocks"]
    return report("generate", **res)


if __name__ == "__main__":
    main()
