"""Packed rows without a dense mask: per-document (varlen) attention for the backbone.

transformers isolates the documents of a packed row (position ids restarting at 0) by building a
block-diagonal ``[B, 1, L, L]`` mask for SDPA, which rules out SDPA's flash and cuDNN kernels. With
``lm.packed_attention: varlen`` the rows are flattened into one sequence, each document delimited by
``cu_seqlens`` (the layout flash-attn's varlen kernels take), and the backbone's attention becomes
:func:`varlen_attention`, registered with transformers as ``kelix_varlen``:

* on CUDA in bf16/fp16: PyTorch's own flash varlen kernel (``torch.nn.attention.varlen``, no flash-attn
  package needed), causal within each document;
* elsewhere (CPU, float32): the eager fallback, causal SDPA document by document (same result);
* without ``cu_seqlens`` (generation with a KV cache, unpacked rows) it is transformers' SDPA
  attention with SDPA's masks, so nothing else changes.

The flattened row reaches the layers with a prepared mask mapping (``{"full_attention": None}``), which
the decoder LMs of transformers 5 (Qwen3, Llama, ...) take as is instead of building a mask.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

VARLEN = "kelix_varlen"
HOST_BOUNDS = "kelix_doc_bounds"  # attention kwarg: cu_seqlens as a host list (the step plan's), read by the fallback
PACKED_ATTENTION = ("auto", "mask", "varlen")


def varlen_kernel():
    """PyTorch's varlen flash attention, or None on releases without it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def doc_bounds(position_ids: torch.Tensor) -> torch.Tensor:
    """``cu_seqlens`` (int32 ``[docs + 1]``) of the rows ``position_ids [B, L]`` flattened into one: a
    document starts at each row's start and wherever a position does not continue the one before
    (transformers' rule for packed rows). One host sync on a device: the number of documents (the step
    plan, :mod:`kelix.llm.plan`, counts them on the host at collate time instead)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    idx = starts.flatten().nonzero().flatten()
    return torch.cat([idx, idx.new_tensor([position_ids.numel()])]).to(torch.int32)


def packed_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """``[B, 1, L, L]`` bool (True: attend) of packed rows, causal within each document: the mask
    transformers builds for SDPA from the position ids, built on the device without its host sync (its
    packed-sequence check reads a bool back)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    doc = starts.cumsum(-1)
    L = position_ids.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=position_ids.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def square_sum(position_ids: torch.Tensor) -> torch.Tensor:
    """Sum of squared document lengths of packed rows, on their device (no host sync): a document of
    n positions 0..n-1 gives sum(2p + 1) = n^2 (the padding counts as the document it is)."""
    return (2 * position_ids + 1).sum()


def _fast(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and varlen_kernel() is not None


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """transformers attention interface: ``query [1, H, T, d]``, ``key/value [1, Hkv, T, d]`` of one
    flattened row -> ``([1, T, H, d], None)``, causal within each ``cu_seq_lens_q`` document."""
    bounds = kwargs.pop(HOST_BOUNDS, None)
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"varlen attention takes one flattened row, got a batch of {query.shape[0]}")
    if kwargs.get("sliding_window"):
        raise ValueError("lm.packed_attention=varlen does not support sliding-window layers: use mask")
    dropout = dropout if module.training else 0.0
    if dropout:
        raise ValueError("lm.packed_attention=varlen has no attention dropout: use mask")
    dev = query.device.type
    if torch.is_autocast_enabled(dev):  # a custom op is outside autocast's lists: cast as SDPA would be
        dt = torch.get_autocast_dtype(dev)
        query, key, value = query.to(dt), key.to(dt), value.to(dt)
    q, k, v = query[0], key[0], value[0]  # [H, T, d]
    if _fast(q):
        out = varlen_kernel()(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), cu_seq_lens_q, cu_seq_lens_q,
                              max_length_q or q.shape[1], max_length_q or q.shape[1], scale=scaling,
                              window_size=(-1, 0), enable_gqa=k.shape[0] != q.shape[0])
        return out[None], None
    bounds = cu_seq_lens_q.tolist() if bounds is None else bounds
    parts = [F.scaled_dot_product_attention(q[:, s:e], k[:, s:e], v[:, s:e], is_causal=True, scale=scaling,
                                            enable_gqa=k.shape[0] != q.shape[0])
             for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    return torch.cat(parts, 1).transpose(0, 1)[None], None


_registered = False


def register() -> None:
    """Make ``kelix_varlen`` an attention implementation transformers knows (once per process)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, sdpa_mask)
    _registered = True


def use_varlen(backbone) -> bool:
    """Switch an SDPA backbone without sliding-window layers to ``kelix_varlen``; False if it cannot."""
    cfg = backbone.config
    if cfg._attn_implementation != "sdpa" or "sliding_attention" in (getattr(cfg, "layer_types", None) or []):
        return False
    register()
    cfg._attn_implementation = VARLEN
    return True
