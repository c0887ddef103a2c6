"""2D rotary positions in the DiT's cross-attention (the released Kelix-DiT, ``use_cross_attn_rope``).

The release rotates the cross-attention queries by each latent token's ``(row, column)`` on the latent
grid and the keys by a ``(row, column)`` given to each condition state, so attention sees where a
condition state sits in the image it describes. It is built here as a diffusers attention processor set
on the SANA cross-attention modules (``attn2``), not as a fork of SANA.

The rotation (per head, ``head_dim`` divisible by 4): the first half of the head is paired with the
second half (rotate-half, as Qwen/LLaMA in HF); pair ``i < head_dim/4`` turns by ``row * f_i``, pair
``head_dim/4 + i`` by ``column * f_i``, with ``f_i = theta^(-4i / head_dim)``, ``theta = 10000``.

Condition positions (the release's rule): a grid ``(h, w)`` is fitted to at most ``max_length`` cells
(Qwen2-VL's ``smart_resize`` with factor 1), then widened so that ``h`` rows hold all ``L`` real states,
``w' = w + ceil((L - h*w) / h)``; state ``i < h*w'`` sits at ``(i // w', i % w')``, later ones at
``(0, 0)``. The release trains with the condition image's merged token grid as ``(h, w)`` and samples
with the nominal square grid ``floor(sqrt(max_length))`` per side (its demo and inference scripts);
:func:`condition_positions` defaults to the latter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

THETA = 10000.0


def latent_positions(h: int, w: int, device=None) -> torch.Tensor:
    """``(row, column)`` of each latent token, row-major: ``[h*w, 2]`` long."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return torch.stack([rows, cols], dim=-1)


def nominal_grid(max_length: int) -> tuple[int, int]:
    """The square grid the release samples with: ``floor(sqrt(max_length))`` per side."""
    side = math.isqrt(max_length)
    return side, side


def condition_positions(lengths: torch.Tensor, width: int, max_length: int,
                        grid: torch.Tensor | tuple[int, int] | None = None) -> torch.Tensor:
    """``(row, column)`` of each condition state: ``[B, width, 2]`` long (see the module docstring).

    Args:
        lengths: ``[B]`` number of real (unpadded) condition states of each item.
        width: length ``L`` of the condition sequence (padding included).
        max_length: the DiT's ``max_condition_length`` (the grid is fitted to at most this many cells).
        grid: ``(h, w)`` for every item, or ``[B, 2]``; None: :func:`nominal_grid`.
    """
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    b = lengths.shape[0]
    if grid is None:
        grid = nominal_grid(max_length)
    grid = torch.as_tensor(grid, dtype=torch.long).reshape(-1, 2).expand(b, 2).tolist()
    out = torch.zeros(b, width, 2, dtype=torch.long)
    for i, ((h0, w0), n) in enumerate(zip(grid, lengths.tolist())):
        if h0 < 1 or w0 < 1:
            raise ValueError(f"condition grid must be positive, got {(h0, w0)}")
        h, w = smart_resize(h0, w0, factor=1, min_pixels=1, max_pixels=max_length)
        w = w + math.ceil((int(n) - h * w) / h)
        if w < 1:  # no real state: nothing to place
            continue
        k = min(width, h * w)
        idx = torch.arange(k)
        out[i, :k, 0], out[i, :k, 1] = idx // w, idx % w
    return out.to(lengths.device)


def rope_cos_sin(pos: torch.Tensor, head_dim: int, theta: float = THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` ``[..., head_dim]`` (float32) of positions ``pos`` ``[..., 2]`` for :func:`apply_rope`."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head size divisible by 4, got {head_dim}")
    half = head_dim // 2  # each axis gets half of the head: head_dim/4 frequencies, each turning a pair
    freq = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float32, device=pos.device) / half)
    ang = torch.cat([pos[..., :1].float() * freq, pos[..., 1:].float() * freq], dim=-1)  # [..., head_dim/2]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, heads, S, head_dim]`` by ``cos, sin`` ``[B or 1, S, head_dim]`` (rotate-half), in float32."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rot = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos[:, None] + rot * sin[:, None]).to(x.dtype)


class CrossAttnRoPEProcessor:
    """Diffusers attention processor of SANA's cross-attention with 2D RoPE on queries and keys.

    The same computation as diffusers' ``SanaAttnProcessor2_0`` (projections, q/k RMS norms, SDPA with the
    key mask, output projection) plus :func:`apply_rope` on the normalised queries (latent positions) and
    keys (condition positions). SANA's blocks call ``attn2`` without extra arguments, so the positions are
    handed over by :meth:`set_positions` before each transformer call (``KelixDiT.forward`` does it); they
    stay set, so activation checkpointing recomputes with the same ones.
    """

    def __init__(self):
        self.q = self.k = None

    def set_positions(self, q: tuple[torch.Tensor, torch.Tensor], k: tuple[torch.Tensor, torch.Tensor]) -> None:
        """``q``: ``(cos, sin)`` of the latent tokens; ``k``: of the condition states (see :func:`rope_cos_sin`)."""
        self.q, self.k = q, k

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.q is None:
            raise RuntimeError("CrossAttnRoPEProcessor has no positions: call set_positions before the transformer")
        if encoder_hidden_states is None:
            raise ValueError("CrossAttnRoPEProcessor is a cross-attention processor (no encoder_hidden_states given)")
        b, n_kv = encoder_hidden_states.shape[:2]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, n_kv, b)
            attention_mask = attention_mask.view(b, attn.heads, -1, attention_mask.shape[-1])
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(b, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        query = apply_rope(query, *self.q)
        key = apply_rope(key, *self.k)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                             is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor
