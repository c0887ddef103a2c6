"""The released Kelix's block decoder (``decoder_kind: release``), beside the kit's Qwen3-block one.

Same contract as :class:`~kelix.llm.decoder.BlockDecoder` (``x = [h_i, e(t_0), ...]`` -> one output
per slot, ``step`` with a cache for generation), different math, as in the official
``UnifiedTokenDecoder``:

* ``input_linear`` (LLM width D -> width), plus a learned absolute position per slot; no RoPE;
* pre-LN layers with ``nn.LayerNorm`` (with bias, eps 1e-5), multi-head attention with q/k/v/o
  biases and no q/k norm, causal over the slots; a SwiGLU MLP without biases;
* no final norm (the official builds ``final_norm`` but never applies it), then ``output_linear``
  (width -> D) added to the input (a residual around the whole decoder).

The official decoder reads ``N + 1`` positions (the block's N code slots, then the end-of-block slot),
so ``slots`` is ``N + 1`` here; the kit's teacher forcing uses the first N and implies ``<eob>``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ReleaseDecoderLayer(nn.Module):
    """Pre-LN transformer layer: ``x + attn(LN(x))``, then ``+ mlp(LN(.))`` (SwiGLU)."""

    def __init__(self, width: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.sa_norm, self.mlp_norm = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))
        self.o_proj = nn.Linear(width, width)
        self.gate_proj = nn.Linear(width, ffn, bias=False)
        self.up_proj = nn.Linear(width, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, width, bias=False)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, s, _ = t.shape
        return t.view(b, s, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """``x [P, T, width]``; with ``cache`` (a dict, filled in place) the T positions follow the cached ones."""
        y = self.sa_norm(x)
        q, k, v = self._split(self.q_proj(y)), self._split(self.k_proj(y)), self._split(self.v_proj(y))
        causal = True
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
                causal = q.shape[2] > 1  # one new query sees every cached key
            cache["k"], cache["v"] = k, v
        a = F.scaled_dot_product_attention(q, k, v, is_causal=causal and q.shape[2] > 1)
        x = x + self.o_proj(a.transpose(1, 2).reshape(x.shape))
        y = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))


class ReleaseBlockDecoder(nn.Module):
    """The official block decoder (see module docstring).

    Args:
        hidden: the LLM's hidden size D (inputs and outputs).
        slots: learned positions (the release: N + 1).
        width: the decoder's width (release 512).
        layers: transformer layers (release 1).
        heads: attention heads (release 4; ``width`` must divide by it).
        ffn: SwiGLU intermediate size (release 2048).
    """

    def __init__(self, hidden: int, slots: int, width: int = 512, layers: int = 1, heads: int = 4, ffn: int = 2048):
        super().__init__()
        if width % heads:
            raise ValueError(f"decoder_width {width} is not divisible by decoder_heads {heads}")
        self.slots = slots
        self.proj_in = nn.Linear(hidden, width)
        self.slot_embed = nn.Embedding(slots, width)
        self.layers = nn.ModuleList(ReleaseDecoderLayer(width, heads, ffn) for _ in range(layers))
        self.proj_out = nn.Linear(width, hidden)
        # a warm start for new training, as the kit's decoder: slot 0 first predicts what the LM would
        nn.init.normal_(self.slot_embed.weight, std=0.02)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, kind: str = "visual") -> torch.Tensor:
        """Teacher-forced ``x [P, T, D]`` -> outputs ``[P, T, D]`` (T <= slots)."""
        T = x.shape[1]
        if T > self.slots:
            raise ValueError(f"block decoder input has {T} positions, more than its {self.slots} slots")
        z = self.proj_in(x) + self.slot_embed.weight[:T]
        for layer in self.layers:
            z = layer(z)
        return x + self.proj_out(z)

    def new_cache(self) -> list[dict]:
        return [{} for _ in self.layers]

    def step(self, x: torch.Tensor, slot: int, cache: list[dict], kind: str = "visual") -> torch.Tensor:
        """One position: ``x [P, D]`` (h_i for slot 0, else the previous token's embedding) -> ``[P, D]``."""
        if not cache:  # an empty list from a caller that does not know this decoder's cache
            cache.extend(self.new_cache())
        z = self.proj_in(x[:, None]) + self.slot_embed.weight[slot]
        for layer, c in zip(self.layers, cache):
            z = layer(z, c)
        return x + self.proj_out(z[:, 0])
