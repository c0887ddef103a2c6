"""Optimizer and learning-rate schedule shared by every Kelix module."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn


@dataclass
class OptimConfig:
    """AdamW with per-group learning rates and a warmup + decay schedule.

    Args:
        lr: peak learning rate of parameters no ``group_lr`` prefix matches.
        group_lr: parameter-name prefix -> peak learning rate (first match wins), e.g.
            ``{"encoder.": 1e-5, "quantizer.": 1e-4}`` for the tokenizer's separate rates.
        weight_decay: decoupled weight decay; never applied to biases, norms, 1-D parameters and the
            names a module's ``no_weight_decay()`` returns (the tokenizer's SimVQ codebook projections).
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: linear warmup from 0 to the peak.
        schedule: ``constant`` after warmup; ``cosine`` or ``linear`` decay to ``min_lr_ratio * lr``
            over the run (``anneal`` stages use these); ``wsd`` warmup-stable-decay with the last
            ``decay_steps`` decaying.
        min_lr_ratio: final learning rate as a fraction of the peak (cosine, linear, wsd).
        decay_steps: length of the decay phase for ``wsd``.
        total_steps: schedule length; defaults to the trainer's estimated optimizer steps.
        grad_clip: the clipping threshold (also settable as ``trainer.gradient_clip_val``); None: no clipping.
        grad_clip_algorithm: ``norm`` clips the global gradient norm to ``grad_clip``; ``value`` clamps every
            gradient element to ``[-grad_clip, grad_clip]``, as the official training scripts' ``--clip-range``
            (``trainer.gradient_clip_algorithm``, when set, wins).
    """

    lr: float = 1e-4
    group_lr: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear", "wsd"] = "cosine"
    min_lr_ratio: float = 0.1
    decay_steps: int = 0
    total_steps: int | None = None
    grad_clip: float | None = None
    grad_clip_algorithm: Literal["norm", "value"] = "norm"


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters grouped by (``group_lr`` prefix, decay or not); frozen ones are left out.

    Each group is named (``default``, ``encoder``, ``default_no_decay``...) so the learning-rate
    monitor logs ``lr/<name>``.
    """
    groups: dict[tuple[str, bool], dict] = {}
    no_decay = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()  # names a module exempts
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        prefix = next((k for k in cfg.group_lr if name.startswith(k)), None)
        lr = cfg.group_lr[prefix] if prefix is not None else cfg.lr
        decay = p.ndim >= 2 and "norm" not in name.lower() and "embed" not in name.lower() and name not in no_decay
        label = (prefix.rstrip(".") if prefix else "default") + ("" if decay else "_no_decay")
        g = groups.setdefault((label, decay), {"params": [], "lr": lr, "initial_lr": lr, "name": label,
                                               "weight_decay": cfg.weight_decay if decay else 0.0, "names": []})
        g["params"].append(p)
        g["names"].append(name)
    if not groups:
        raise ValueError("no trainable parameters: check the stage's freezing options")
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: OptimConfig, total_steps: int) -> dict:
    """AdamW + LambdaLR schedule in Lightning's ``configure_optimizers`` format."""
    from transformers import optimization as sched

    groups = param_groups(model, cfg)
    for g in groups:
        g.pop("names")
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    total = max(1, cfg.total_steps or total_steps)
    warm = min(cfg.warmup_steps, total)
    if cfg.schedule == "constant":
        s = sched.get_constant_schedule_with_warmup(opt, warm)
    elif cfg.schedule == "cosine":
        s = sched.get_cosine_with_min_lr_schedule_with_warmup(opt, warm, total, min_lr_rate=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        s = sched.get_wsd_schedule(opt, warm, total - warm, num_stable_steps=0, decay_type="linear",
                                   min_lr_ratio=cfg.min_lr_ratio)
    elif cfg.schedule == "wsd":
        if not 0 < cfg.decay_steps <= total - warm:
            raise ValueError(f"optim.decay_steps must be in (0, {total - warm}] for the wsd schedule, got {cfg.decay_steps}")
        s = sched.get_wsd_schedule(opt, warm, cfg.decay_steps, total, decay_type="cosine", min_lr_ratio=cfg.min_lr_ratio)
    else:
        raise ValueError(f"optim.schedule {cfg.schedule!r} is not constant, cosine, linear or wsd")
    return {"optimizer": opt, "lr_scheduler": {"scheduler": s, "interval": "step", "name": "lr"}}
