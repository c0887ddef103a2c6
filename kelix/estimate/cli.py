"""``kelix estimate``: parameters, memory per GPU, FLOPs and time of a recipe's run, before launching it.

``kelix estimate --config recipes/official/sft_lora.yaml [--gpus 8] [--gpu-mem 80] [--mfu 0.35]``

Exit status 0 when the run fits, 1 when it does not (the knobs that make it fit are printed), 2 on bad input.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from dataclasses import dataclass, field, replace

from kelix.estimate.memory import (
    GIB,
    H100_BF16,
    HEADROOM,
    LLMRun,
    Memory,
    dit_memory,
    llm_memory,
    llm_step_flops,
)
from kelix.estimate.recipe import RecipeError, get, load_recipe, run_shape

LLM, DIT = "kelix.llm.module.UnifiedLLMModule", "kelix.dit.module.DiTModule"


@dataclass
class Estimate:
    """What ``kelix estimate`` prints (see :func:`estimate`)."""

    kind: str
    shape: object
    parts: list
    memory: Memory  # under the recipe's own activation checkpointing setting
    other: Memory  # with checkpointing the other way
    gpu_mem: float
    flops_per_gpu: float  # model FLOPs of one optimizer step on one GPU
    tokens_per_step: int
    step_s: float
    knobs: list[tuple[str, float]] = field(default_factory=list)  # (what to set, GiB per GPU then)

    @property
    def usable(self) -> float:
        return self.gpu_mem * (1 - HEADROOM)

    @property
    def fits(self) -> bool:
        return self.memory.total / GIB <= self.usable


def _memory_fn(kind: str, init_args: dict, recipe: dict, args):
    """``(parts, f(shape, checkpointing) -> Memory, flops(shape), tokens per row)`` of the recipe's model."""
    if kind == LLM:
        from kelix.estimate.models import llm_parts

        parts, lm = llm_parts(init_args)

        def mem(shape, ckpt):
            return llm_memory(lm, parts, shape, LLMRun(ckpt, init_args.get("fsdp_param_dtype"), args.visual_frac))

        return parts, mem, lambda shape: llm_step_flops(lm, shape, args.visual_frac), None
    from kelix.estimate.models import dit_parts

    parts, model = dit_parts(init_args)
    proc = get(recipe, "data.init_args.processor.init_args", {}) or {}
    factor = parts[3].factor or 32
    tokens = (int(proc.get("target_size", 1024)) // factor // model.transformer.config.patch_size) ** 2
    cond = int((init_args.get("dit") or {}).get("max_condition_length", 720))

    def mem(shape, ckpt):
        return dit_memory(model, parts, shape, ckpt, init_args.get("fsdp_param_dtype"), tokens, cond)

    def flops(shape):
        n = sum(p.numel() for p in model.parameters())
        cfg = model.transformer.config
        cross = 6 * cfg.num_layers * 2 * tokens * cond * cfg.num_cross_attention_heads * cfg.cross_attention_head_dim
        return float(6 * n * tokens + cross) * shape.micro_batch * shape.accumulate

    return parts, mem, flops, tokens


def estimate(configs: list[str], gpus: int | None = None, gpu_mem: float = 80.0, mfu: float = 0.35,
             tokens_per_step: int | None = None, peak_tflops: float | None = None, visual_frac: float = 0.5,
             overrides: dict | None = None) -> Estimate:
    """The estimate of the recipe ``configs`` (merged): see the module docstring. Raises
    :class:`~kelix.estimate.recipe.RecipeError` (one line) on a recipe it cannot read."""
    args = argparse.Namespace(visual_frac=visual_frac)
    recipe = load_recipe(configs, overrides)
    kind = get(recipe, "model.class_path")
    if kind not in (LLM, DIT):
        raise RecipeError(f"model.class_path {kind!r}: the estimate knows {LLM} and {DIT}")
    init_args = copy.deepcopy(get(recipe, "model.init_args", {}) or {})
    shape = run_shape(recipe, gpus)
    parts, mem, flops, tokens = _memory_fn(kind, init_args, recipe, args)
    if tokens is not None:  # a DiT row is one image's latent tokens
        shape = replace(shape, row_length=tokens)
    if tokens_per_step:
        per = shape.micro_batch * shape.row_length * shape.gpus
        shape = replace(shape, accumulate=max(1, math.ceil(tokens_per_step / per)))
    ckpt = bool(init_args.get("activation_checkpointing", False))
    f = flops(shape)
    peak = (peak_tflops * 1e12) if peak_tflops else H100_BF16
    est = Estimate(kind.rsplit(".", 1)[-1], shape, parts, mem(shape, ckpt), mem(shape, not ckpt), gpu_mem, f,
                   shape.micro_batch * shape.row_length * shape.accumulate * shape.gpus, f / (mfu * peak))
    if not est.fits:
        est.knobs = _knobs(est, mem, shape, ckpt, kind, init_args, args)
    return est


def _knobs(est: Estimate, mem, shape, ckpt: bool, kind: str, init_args: dict, args) -> list[tuple[str, float]]:
    """Each single change that makes the run fit, with its GiB per GPU."""
    knobs, ok = [], (lambda m: m.total / GIB <= est.usable)
    if not ckpt and ok(est.other):
        knobs.append(("model.init_args.activation_checkpointing: true", est.other.total / GIB))
    for c in ([ckpt] if ckpt else [ckpt, True]):
        for mb in range(shape.micro_batch - 1, 0, -1):
            m = mem(replace(shape, micro_batch=mb), c)
            if ok(m):
                acc = math.ceil(shape.micro_batch * shape.accumulate / mb)
                knobs.append((f"data.init_args.batch_size: {mb} with trainer.accumulate_grad_batches: {acc}"
                              + ("" if c == ckpt else " and activation checkpointing"), m.total / GIB))
                break
        else:
            continue
        break
    for g in [2 ** i for i in range(1, 11)]:
        if g <= shape.gpus and shape.strategy == "fsdp2":
            continue
        m = mem(replace(shape, gpus=g, strategy="fsdp2"), ckpt)
        if ok(m):
            what = "trainer.strategy: fsdp2 on" if shape.strategy != "fsdp2" else "FSDP2 over"
            knobs.append((f"{what} {g} GPUs", m.total / GIB))
            break
    if kind == LLM and init_args.get("lora") is None:
        from kelix.estimate.models import llm_parts

        parts, lm = llm_parts({**init_args, "lora": {}})
        m = llm_memory(lm, parts, shape, LLMRun(ckpt, init_args.get("fsdp_param_dtype"), args.visual_frac))
        if ok(m):
            knobs.append(("model.init_args.lora: {} (LoRA r=16 on the backbone; lm.dtype bfloat16 halves the frozen base)",
                          m.total / GIB))
    return knobs


def _fmt(n: int) -> str:
    return f"{n:,}"


def _hours(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min"


def render(est: Estimate, configs: list[str], mfu: float) -> str:
    s = est.shape
    lines = [f"recipe: {' + '.join(configs)} ({est.kind})",
             f"run: {s.gpus} GPU(s) x {est.gpu_mem:g} GiB, {s.strategy}, {s.precision}, micro-batch {s.micro_batch} x "
             f"{_fmt(s.row_length)} tokens, accumulate {s.accumulate}" + (f", {_fmt(s.max_steps)} steps" if s.max_steps else ""),
             "", f"{'parameters':<34}{'trainable':>16}{'frozen':>16}"]
    for p in est.parts:
        lines.append(f"  {p.name:<32}{_fmt(p.trainable):>16}{_fmt(p.frozen):>16}" + (f"   {p.note}" if p.note else ""))
    lines.append(f"  {'total':<32}{_fmt(sum(p.trainable for p in est.parts)):>16}{_fmt(sum(p.frozen for p in est.parts)):>16}")
    on, off = (est.memory, est.other) if est.memory.checkpointing else (est.other, est.memory)
    mine = "on" if est.memory.checkpointing else "off"
    lines += ["", f"{'memory per GPU (GiB)':<34}{'checkpointing on':>18}{'off':>10}   (the recipe: {mine})"]
    rows = [("weights", "weights"), ("gradients (held at the peak)", "gradients"), ("AdamW state", "optimizer"),
            ("FSDP2 gathered copies", "gathered"), ("autocast bf16 copies", "autocast_copies"),
            ("activations", "activations"), ("slot-head logits (transient)", "loss"),
            ("one layer recomputed", "recompute")]
    for label, key in rows:
        lines.append(f"  {label:<32}{getattr(on, key) / GIB:>18.2f}{getattr(off, key) / GIB:>10.2f}")
    lines.append(f"  {'peak':<32}{on.total / GIB:>18.2f}{off.total / GIB:>10.2f}")
    lines.append("")
    if est.fits:
        lines.append(f"fits: {est.memory.total / GIB:.1f} GiB per GPU of {est.usable:.1f} usable "
                     f"({est.gpu_mem:g} GiB less {HEADROOM:.0%} headroom)")
    else:
        lines.append(f"does not fit: {est.memory.total / GIB:.1f} GiB per GPU > {est.usable:.1f} usable "
                     f"({est.gpu_mem:g} GiB less {HEADROOM:.0%} headroom)")
        if est.knobs:
            lines += ["knobs that make it fit (each alone):"] + [f"  {k}  -> {g:.1f} GiB" for k, g in est.knobs]
        else:
            lines.append("no single knob makes it fit: combine checkpointing, a smaller micro-batch, more GPUs, LoRA")
    lines.append(f"step: {_fmt(est.tokens_per_step)} tokens per optimizer step, {est.flops_per_gpu:.3g} model FLOPs per GPU, "
                 f"{est.step_s:.2f} s at MFU {mfu:g}")
    if s.max_steps:
        lines.append(f"run: {_fmt(s.max_steps)} steps in {_hours(est.step_s * s.max_steps)} "
                     f"({est.step_s * s.max_steps * s.gpus / 3600:.0f} GPU-hours)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kelix estimate", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", required=True, help="recipe YAML (repeat to merge, as kelix fit)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs of the run (default: trainer.devices x num_nodes)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    p.add_argument("--mfu", type=float, default=0.35, help="model FLOPs utilisation for the time (default 0.35)")
    p.add_argument("--tokens-per-step", type=int, default=None,
                   help="tokens per optimizer step over all GPUs: sets the accumulation (default: the recipe's)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of one GPU (default 989, H100/H200)")
    p.add_argument("--visual-frac", type=float, default=0.5, help="share of visual blocks among the targets (LLM)")
    a = p.parse_args(argv)
    if not 0 < a.mfu <= 1 or not 0 <= a.visual_frac <= 1 or a.gpu_mem <= 0 or (a.gpus is not None and a.gpus < 1):
        print("kelix estimate: --mfu must be in (0, 1], --visual-frac in [0, 1], --gpu-mem and --gpus positive",
              file=sys.stderr)
        return 2
    import logging

    loggers = [logging.getLogger(name) for name in ("kelix", "transformers", "diffusers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:  # building on meta says nothing worth reading (restored after: a caller's logging stays)
        lg.setLevel(logging.ERROR)
    try:
        est = estimate(a.config, a.gpus, a.gpu_mem, a.mfu, a.tokens_per_step, a.peak_tflops, a.visual_frac)
    except (RecipeError, FileNotFoundError, KeyError, TypeError) as e:
        print(f"kelix estimate: {e}", file=sys.stderr)
        return 2
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    print(render(est, a.config, a.mfu))
    return 0 if est.fits else 1
