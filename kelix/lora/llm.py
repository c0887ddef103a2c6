"""LoRA on the unified LLM: adapters on the backbone's projections, and which of the rest trains (block decoder,
the LM head's visual rows, the embedding table), per :class:`~kelix.lora.adapters.LoRAConfig`."""

from __future__ import annotations

import torch
from torch import nn

from kelix.lora.adapters import LoRAConfig, apply_lora


def apply_llm_lora(lm: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Adapters on ``lm.backbone`` (which is then frozen but for them), the block decoder, the head's visual
    rows and the embedding table trainable as ``cfg`` says; every trainable tensor is made float32 (a
    bfloat16 base stays bfloat16 and frozen). Returns ``lm``."""
    apply_lora(lm.backbone, cfg)
    lm.decoder.requires_grad_(cfg.train_decoder)
    head = lm.lm_head
    head.requires_grad_(cfg.train_visual_head)
    lm.visual_bias.requires_grad_(cfg.train_visual_head)
    lm.backbone.get_input_embeddings().requires_grad_(cfg.train_embeddings)
    if lm.visual is not None:
        lm.visual.requires_grad_(cfg.train_embeddings)
    for p in lm.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    return lm


def text_row_mask(lm: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """``[rows, 1]`` of 1 on the LM head's visual rows and 0 on its text rows, placed like ``like`` (a gradient,
    a DTensor under FSDP2: the mask is then sharded the same way)."""
    rows = lm.lm_head.weight.shape[0]
    mask = (torch.arange(rows, device=like.device) >= lm.vocab.visual_offset).to(like.dtype)[:, None]
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        mask = distribute_tensor(mask.expand(-1, like.shape[1]).contiguous(), like.device_mesh, like.placements)
    return mask


@torch.no_grad()
def keep_text_rows_(lm: nn.Module) -> None:
    """Zero the gradient of the LM head's text rows (before clipping and the optimizer step): with no weight
    decay on the head, AdamW then leaves them exactly as they were."""
    w = lm.lm_head.weight
    if w.grad is not None:
        w.grad.mul_(text_row_mask(lm, w.grad))
