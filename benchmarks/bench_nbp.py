"""Next-block prediction against its alternatives on one image-heavy batch: a training step (forward +
backward) of (a) NBP with N codes per block, (b) a single-code model (N=1) on the same images, (c) flat
next-token prediction over all N codes of every patch (an N times longer sequence).

The backbone is Qwen3-8B's width against the paper's 1-layer width-512 block decoder (ratio 8), its
depth scaled down to fit (``--layers``, 12 of 36 on a GPU: the flat run's 16k-token sequence must fit
beside its weights and gradients); on CPU both are scaled to a width-256 backbone and a width-32
decoder. ``flops_*`` are the same ratios in model FLOPs (what the times would be at equal efficiency). Steps run in turns, after one warm-up each; the peak
memory of each is above the weights resident before it. ``nbp_over_single`` = a/b (goal <= 1.10), ``flat_over_nbp`` = c/a (goal >= 6 at 1,024 patches
per image).

The NBP steps pass the batch's step plan (:mod:`kelix.llm.plan`, as training does: no host syncs;
``--no-plan``: the boolean-mask fallback); ``step_plan`` says which one their forward took.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from benchmarks.bench_llm import QWEN3
from benchmarks.bench_mfu import on_device
from benchmarks.common import report, timeit

CPU_BACKBONE = dict(model_type="qwen3", vocab_size=320, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=65536,
                    rope_theta=1e6, tie_word_embeddings=False)


def image_batch(vocab, images: int, patches: int, text: int, device, plan: bool = True):
    """One row: ``text`` text blocks then ``images`` images of ``patches`` visual blocks each (codes of
    every slot drawn at random); every block but the first is a target. Returns the model's inputs and
    their step plan (:func:`~benchmarks.bench_mfu.on_device`)."""
    g = torch.Generator().manual_seed(0)
    L = text + images * patches
    tokens = torch.full((1, L), -1)
    tokens[0, :text] = torch.randint(0, 250, (text,), generator=g)
    codes = torch.randint(0, vocab.K, (1, L, vocab.N), generator=g)
    codes[0, :text] = -1
    targets = torch.ones(1, L, dtype=torch.bool)
    targets[0, 0] = False
    return on_device(tokens, codes, torch.arange(L)[None], targets, device, plan)


def flat_ids(lm, tokens, codes):
    """The same row as plain next-token ids: each visual block becomes its N code ids in slot order."""
    v = lm.vocab
    parts = []
    for t, c in zip(tokens[0].tolist(), codes[0]):
        parts.append(torch.tensor([t], device=codes.device) if t >= 0 else v.code_to_id(c))
    return torch.cat(parts)[None]


def flat_loss(lm, ids, chunk: int):
    """Next-token cross-entropy of a plain LM over the whole vocabulary, logits one checkpointed chunk
    at a time (as the NBP head's loss, so that only the sequence length differs)."""
    from torch.utils.checkpoint import checkpoint

    h = lm.final_norm(lm.hidden(lm.backbone.get_input_embeddings()(ids))[0])[0, :-1]
    y = ids[0, 1:]
    w = lm.lm_head.weight

    def ce(x, t):
        return nn.functional.cross_entropy(nn.functional.linear(x, w).float(), t, reduction="sum")

    total = sum(checkpoint(ce, h[s:s + chunk], y[s:s + chunk], use_reentrant=False) for s in range(0, len(y), chunk))
    return total / len(y)


def flat_flops(lm, T: int) -> float:
    """Model FLOPs of a flat training step on ``T`` tokens: the backbone's weights, causal attention
    and a full-vocabulary head per token (as :meth:`KelixLM.train_flops` counts NBP)."""
    cfg = lm.backbone.config
    params = sum(p.numel() for n, p in lm.body.named_parameters() if "embed" not in n)
    hd = cfg.num_attention_heads * cfg.head_dim
    return 6 * (params + lm.hidden_size * lm.lm_head.weight.shape[0]) * T + 6 * cfg.num_hidden_layers * hd * T * T


def main(argv=None):
    from kelix.llm.loss import nbp_loss
    from kelix.llm.model import KelixLM, LLMConfig

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser()
    p.add_argument("--gpu", action="store_true", help="the GPU sizes below even without auto-detection")
    p.add_argument("--layers", type=int, help="backbone layers (default 12 on a GPU, 2 on CPU)")
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--patches", type=int, help="visual blocks per image (default 1024 on a GPU, 16 on CPU)")
    p.add_argument("--text", type=int, default=32, help="text blocks before the images")
    p.add_argument("--N", type=int, default=8)
    p.add_argument("--repeat", type=int, help="timed steps of each (median, in turns; default 5)")
    p.add_argument("--no-plan", action="store_true", help="no step plan: the boolean-mask selection (host syncs)")
    a = p.parse_args(argv)
    gpu = cuda or a.gpu
    device = "cuda" if cuda else "cpu"
    backbone = dict(QWEN3["8b"] if gpu else CPU_BACKBONE, num_hidden_layers=a.layers or (12 if gpu else 2))
    patches = a.patches or (1024 if gpu else 16)
    decoder = {} if gpu else dict(decoder_width=32, decoder_heads=4, decoder_ffn=96)
    K = 8192 if gpu else 64
    dtype = torch.bfloat16 if cuda else torch.float32
    res = {"backbone": {k: backbone[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")},
           "decoder_width": decoder.get("decoder_width", 512), "images": a.images, "patches_per_image": patches,
           "text_blocks": a.text, "N": a.N, "K": K, "device": device, "dtype": str(dtype).removeprefix("torch.")}
    repeat = a.repeat or 5
    planned = set()  # whether each NBP forward took the plan path

    def nbp_step_loss(lm, batch, plan):
        pred = lm(*batch, plan=plan)
        planned.add(pred.plan is not None)
        return nbp_loss(pred, lm.vocab.N)["loss"]

    def step_fn(lm, loss_fn):
        params = [q for q in lm.parameters() if q.requires_grad]

        def step():
            with torch.autocast(device, dtype=dtype, enabled=cuda):
                loss = loss_fn()
            loss.backward()
            for q in params:
                q.grad = None
        return step

    def measure(steps: dict):
        """Median seconds of each step, run in turns (a shared CPU's load drifts alike for all), and
        on a GPU each one's peak memory above what was allocated before it (the resident weights)."""
        for name, fn in steps.items():
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            fn()  # warm-up
            res[f"{name}_peak_memory_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 2) if cuda else None
        times = {k: [] for k in steps}
        for _ in range(repeat):
            for k, fn in steps.items():
                times[k].append(timeit(fn, warmup=0, repeat=1))
        for k, v in times.items():
            res[f"{k}_step_s"] = round(sorted(v)[len(v) // 2], 4)

    def build(name, N):
        torch.manual_seed(0)
        lm = KelixLM(LLMConfig(backbone_config=backbone, text_tokenizer="builtin:bytes", N=N, K=K, **decoder)).to(device)
        batch, plan = image_batch(lm.vocab, a.images, patches, a.text, device, plan=not a.no_plan)
        L = batch[0].shape[1]
        res[f"{name}_sequence"] = L
        res[f"{name}_flops"] = float(lm.train_flops(1, L, visual_blocks=int((batch[0] < 0).sum())))
        steps = {name: step_fn(lm, lambda: nbp_step_loss(lm, batch, plan))}
        if name == "nbp":  # (c) on the same backbone, vocabulary and codes as (a)
            ids = flat_ids(lm, batch[0], batch[1])
            res["flat_sequence"] = ids.shape[1]
            res["flat_flops"] = float(flat_flops(lm, ids.shape[1]))
            steps["flat"] = step_fn(lm, lambda: flat_loss(lm, ids, lm.config.loss_chunk))
        return steps

    if cuda:  # one model on the device at a time
        measure(build("nbp", a.N))
        measure(build("single", 1))
    else:
        measure(build("nbp", a.N) | build("single", 1))
    res["step_plan"] = planned == {True}
    res["nbp_over_single"] = round(res["nbp_step_s"] / res["single_step_s"], 3)
    res["flat_over_nbp"] = round(res["flat_step_s"] / res["nbp_step_s"], 3)
    res["flops_nbp_over_single"] = round(res["nbp_flops"] / res["single_flops"], 3)
    res["flops_flat_over_nbp"] = round(res["flat_flops"] / res["nbp_flops"], 3)
    return report("nbp", **res)


if __name__ == "__main__":
    main()
