"""Tokens/s and MFU of a unified-LLM training step at Qwen3-1.7B shape (GPU) on packed rows of 4,096
blocks with per-document attention, bf16 autocast, AdamW.

FLOPs: ``flops_model`` is :meth:`KelixLM.train_flops` (6 per weight per block, the slot heads' rows,
causal attention within each document, the block decoder's slots), the count MFU is reported on
(``mfu``, counted as Megatron-LM and torchtitan do); ``flops_measured`` is Lightning's ``measure_flops``
(PyTorch's FlopCounterMode) of the same step, which counts attention however the kernel is seen (SDPA
per document as a full square, the CUDA varlen kernel not at all) and the recomputed loss chunks twice. ``packed_attention`` compares the
varlen path with transformers' dense block-diagonal mask (``mask_step_s``) unless ``--no-compare``.

Each step passes the batch's step plan (:mod:`kelix.llm.plan`, built on the host as ``collate_docs``
does, then moved to the device as Lightning moves a batch), so it is training's sync-free step;
``--no-plan`` times the boolean-mask fallback instead. ``step_plan`` says which one the forward took.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.bench_llm import QWEN3
from benchmarks.common import report, time_train_step


def on_device(tokens, codes, position_ids, targets, device, plan: bool = True):
    """The model's inputs ``[tokens, codes, position_ids, targets]`` on ``device`` and the step plan of
    these host tensors (:func:`~kelix.llm.plan.step_plan`, on ``device`` too; None with ``plan=False``)."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from kelix.llm.plan import step_plan

    p = step_plan(tokens, targets, position_ids) if plan else None
    return [t.to(device) for t in (tokens, codes, position_ids, targets)], move_data_to_device(p, device)


def packed_rows(vocab, rows: int, length: int, visual_frac: float, device, min_doc: int = 64, seed: int = 0,
                plan: bool = True):
    """Rows of ``length`` blocks, each filled with documents of random lengths (``min_doc`` up to
    half a row; the last one fills the row), position ids restarting per document, a share of blocks
    visual. Returns the model's inputs, their step plan (see :func:`on_device`) and the document lengths."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.zeros(rows, length, dtype=torch.long)
    docs = []
    for r in range(rows):
        off = 0
        while off < length:
            n = min(length - off, int(torch.randint(min_doc, max(min_doc + 1, length // 2), (1,), generator=g)))
            pos[r, off:off + n] = torch.arange(n)
            docs.append(n)
            off += n
    tokens = torch.randint(0, 250, (rows, length), generator=g)
    is_vis = torch.rand(rows, length, generator=g) < visual_frac
    tokens[is_vis] = -1
    codes = torch.randint(0, vocab.K, (rows, length, vocab.N), generator=g)
    codes[~is_vis] = -1
    targets = pos > 0
    return *on_device(tokens, codes, pos, targets, device, plan), docs


def main(argv=None):
    from lightning.fabric.utilities.throughput import measure_flops

    from kelix.hf import TINY_QWEN3
    from kelix.llm.loss import nbp_loss
    from kelix.llm.model import KelixLM, LLMConfig
    from kelix.training.callbacks import peak_flops

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser()
    p.add_argument("--gpu", action="store_true", help="the GPU sizes even without auto-detection")
    p.add_argument("--rows", type=int, help="packed rows per step (default 2 on a GPU, 2 on CPU)")
    p.add_argument("--length", type=int, help="blocks per row (default 4096 on a GPU, 128 on CPU)")
    p.add_argument("--visual-frac", type=float, default=0.5)
    p.add_argument("--packed-attention", choices=["auto", "mask", "varlen"], default="varlen")
    p.add_argument("--compile", action="store_true", help="torch.compile each backbone layer (lm.compile_layers)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--no-compare", action="store_true", help="skip the dense-mask step")
    p.add_argument("--no-plan", action="store_true", help="no step plan: the boolean-mask selection (host syncs)")
    p.add_argument("--repeat", type=int, help="timed steps (median; default 5 on a GPU, 2 on CPU)")
    a = p.parse_args(argv)
    gpu = cuda or a.gpu
    device = "cuda" if cuda else "cpu"
    rows, length = a.rows or 2, a.length or (4096 if gpu else 128)
    repeat = a.repeat or (5 if gpu else 2)
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = QWEN3["1.7b"] if gpu else dict(TINY_QWEN3, max_position_embeddings=max(4096, length))
    extra = {} if gpu else dict(decoder_width=32, decoder_heads=2, decoder_ffn=64)

    def build(mode, compile_layers=False):
        torch.manual_seed(0)
        lm = KelixLM(LLMConfig(backbone_config=shape, text_tokenizer="builtin:bytes", N=8 if gpu else 4,
                               K=8192 if gpu else 64, attn_implementation="sdpa", packed_attention=mode,
                               compile_layers=compile_layers, **extra)).to(device)
        if a.activation_checkpointing:
            from kelix.training.parallel import apply_activation_checkpointing

            apply_activation_checkpointing(lm, lm.blocks())
        return lm

    lm = build(a.packed_attention, a.compile)
    batch, plan, docs = packed_rows(lm.vocab, rows, length, a.visual_frac, device, plan=not a.no_plan)
    planned = set()  # whether each forward took the plan path

    def loss_of(model):
        def f():
            with torch.autocast(device, dtype=dtype, enabled=cuda):
                pred = model(*batch, plan=plan)
                planned.add(pred.plan is not None)
                return nbp_loss(pred, model.vocab.N)["loss"]
        return f

    opt = torch.optim.AdamW([q for q in lm.parameters() if q.requires_grad], lr=1e-5, fused=cuda)
    t = time_train_step(loss_of(lm), opt, repeat=repeat)
    blocks = rows * length
    flops = lm.train_flops(rows, length, sum(n * n for n in docs), int((batch[0] < 0).sum()))
    res = {"shape": "qwen3-1.7b" if gpu else "tiny", "rows": rows, "blocks_per_row": length, "documents": len(docs),
           "N": lm.vocab.N, "K": lm.vocab.K, "dtype": str(dtype).removeprefix("torch."), "device": device,
           "packed_attention": a.packed_attention, "step_plan": None, "compile_layers": a.compile,
           "activation_checkpointing": a.activation_checkpointing,
           "params_m": round(sum(q.numel() for q in lm.parameters()) / 1e6, 1), "train_step_s": round(t, 4),
           "tokens_per_s": round(blocks / t, 1), "flops_model": float(flops)}
    if cuda:
        res["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    res["flops_measured"] = float(measure_flops(lm, loss_of(lm), lambda loss: loss))
    opt.zero_grad(set_to_none=True)
    peak = peak_flops(torch.device(device), torch.bfloat16)
    res["peak_flops"] = peak
    res["mfu"] = round(flops / t / peak, 4) if peak else None
    res["mfu_measured_flops"] = round(res["flops_measured"] / t / peak, 4) if peak else None
    if not a.no_compare and a.packed_attention != "mask":
        del opt
        ref = build("mask")
        ref_opt = torch.optim.AdamW([q for q in ref.parameters() if q.requires_grad], lr=1e-5, fused=cuda)
        res["mask_step_s"] = round(time_train_step(loss_of(ref), ref_opt, repeat=repeat), 4)
        res["mask_over_varlen"] = round(res["mask_step_s"] / t, 3)
        if cuda:
            res["mask_peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    res["step_plan"] = planned == {True}  # every step measured above
    return report("mfu", **res)


if __name__ == "__main__":
    main()
