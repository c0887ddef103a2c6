"""Block decoders (paper Eq. 6): from the backbone's hidden state h_i, the tokens of block i+1.

Both predictors map an input sequence ``x = [h_i, e(t_0), ..., e(t_{T-2})]`` (``[P, T, D]``, LLM
width, teacher forcing) of a ``kind`` block (``text``: T = 1; ``visual``) to ``T`` output vectors
``[P, T, D]``; output ``j`` predicts slot ``j`` of block i+1 through the LLM's final norm and the
LM-head rows legal for that slot (see :class:`~kelix.llm.model.KelixLM`). ``step`` computes one
output at a time with a cache, for generation.

* :class:`BlockDecoder`: a small causal transformer (official: 1 layer, width 512, 4 heads). It is
  a transformers ``Qwen3Model`` body (SDPA/flash attention, KV cache) fed through ``proj_in`` with
  learned slot embeddings; ``proj_out`` is zero-initialised and added to the input, so at
  initialisation slot 0 predicts exactly what the pretrained LM would (a warm start).
* :class:`ParallelHeads`: the ablation of Table 7 exp3, N+1 linear heads reading only h_i
  (identity-initialised): head 0 gives a text block's token, heads 1..N a visual block's N codes
  (the paper's 9 heads for N = 8; ``<eob>`` is implied by the block kind).
"""

from __future__ import annotations

import torch
from torch import nn

MASKLESS_CAUSAL = ("sdpa", "flash_attention_2", "flash_attention_3")


class BlockDecoder(nn.Module):
    """A small causal transformer over the slots of the next block.

    Args:
        hidden: the LLM's hidden size D (inputs and outputs).
        slots: maximum sequence length (N: a visual block's code slots).
        width: the decoder's own width.
        layers: transformer layers.
        heads: attention heads (``width`` must divide by it).
        ffn: SwiGLU intermediate size.
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2``.
    """

    def __init__(self, hidden: int, slots: int, width: int = 512, layers: int = 1, heads: int = 4, ffn: int = 1536,
                 attn_implementation: str = "sdpa"):
        super().__init__()
        from transformers import Qwen3Config, Qwen3Model

        if width % heads:
            raise ValueError(f"decoder_width {width} is not divisible by decoder_heads {heads}")
        cfg = Qwen3Config(vocab_size=1, hidden_size=width, intermediate_size=ffn, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=heads, head_dim=width // heads,
                          max_position_embeddings=max(slots, 16), tie_word_embeddings=False)
        cfg._attn_implementation = attn_implementation
        self.slots = slots
        self.proj_in = nn.Linear(hidden, width)
        self.slot_embed = nn.Embedding(slots, width)
        self.body = Qwen3Model(cfg)
        self.body.embed_tokens = None  # inputs are embeddings; an unused table would only confuse FSDP/DDP
        self.proj_out = nn.Linear(width, hidden)
        nn.init.normal_(self.slot_embed.weight, std=0.02)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, kind: str = "visual") -> torch.Tensor:
        """Teacher-forced ``x [P, T, D]`` -> outputs ``[P, T, D]`` (T <= slots; the same network
        for both kinds of block)."""
        T = x.shape[1]
        if T > self.slots:
            raise ValueError(f"block decoder input has {T} positions, more than its {self.slots} slots")
        z = self.proj_in(x) + self.slot_embed.weight[:T]
        # SDPA and flash are causal without a mask: a prepared mask mapping skips transformers' mask
        # building, whose packed-sequence check (`.all()` on the positions) is a host sync per call
        masks = {"full_attention": None} if self.body.config._attn_implementation in MASKLESS_CAUSAL else None
        z = self.body(inputs_embeds=z, attention_mask=masks, use_cache=False).last_hidden_state
        return x + self.proj_out(z)

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.body.config)

    def step(self, x: torch.Tensor, slot: int, cache, kind: str = "visual") -> torch.Tensor:
        """One position: ``x [P, D]`` (h_i for slot 0, else the embedding of the previous slot's token)
        -> output ``[P, D]`` for ``slot``; ``cache`` (from :meth:`new_cache`) is updated in place."""
        from kelix.hf import cache_kwargs

        z = self.proj_in(x[:, None]) + self.slot_embed.weight[slot]
        pos = torch.full((x.shape[0], 1), slot, dtype=torch.long, device=x.device)
        z = self.body(inputs_embeds=z, position_ids=pos, use_cache=True, **cache_kwargs(self.body, cache))
        return x + self.proj_out(z.last_hidden_state[:, 0])


class ParallelHeads(nn.Module):
    """Table 7 exp3: a text block's vector is ``A_text h_i``, code j's ``A_j h_i`` (no token inputs).

    Args:
        hidden: the LLM's hidden size D.
        slots: code heads (N; ``<eob>`` needs none), besides the text head.
    """

    def __init__(self, hidden: int, slots: int):
        super().__init__()
        self.slots = slots
        # identities: the text head starts as the pretrained LM
        self.text_head = nn.Parameter(torch.eye(hidden))
        self.code_heads = nn.Parameter(torch.eye(hidden).repeat(slots, 1, 1))

    def forward(self, x: torch.Tensor, kind: str = "visual") -> torch.Tensor:
        if kind == "text":
            return (x[:, 0] @ self.text_head.T)[:, None]
        T = x.shape[1]
        return torch.einsum("pd,ted->pte", x[:, 0], self.code_heads[:T])

    def new_cache(self) -> dict:
        return {}

    def step(self, x: torch.Tensor, slot: int, cache: dict, kind: str = "visual") -> torch.Tensor:
        if slot == 0:
            cache["h"] = x
        head = self.text_head if kind == "text" else self.code_heads[slot]
        return cache["h"] @ head.T
