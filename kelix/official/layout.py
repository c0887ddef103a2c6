"""The release's block layout ``[L, N+1]`` against the kit's blocks (``tokens [L]``, ``codes [L, N]``).

The release lays every block out as N+1 slots: ``[t, q_eos, ...]`` for text, ``[c_0 .. c_{N-1}, q_eos]``
with visual ids ``V + j*K + c_j`` for an image block. The kit stores a text block as its id and a
visual block as ``-1`` plus its N codes; ``<eob>`` is implied by the kind. These maps and the
teacher-forced decoder outputs of the official layout are what parity checks against the release use.
"""

from __future__ import annotations

import torch


def blocks_from_expanded(expanded: torch.Tensor, vocab) -> tuple[torch.Tensor, torch.Tensor]:
    """Official ``[L, N+1]`` ids -> kit ``tokens [L]`` (text id, or -1 for a visual block) and ``codes [L, N]``."""
    first = expanded[:, 0]
    visual = vocab.is_visual(first)
    codes = torch.full((expanded.shape[0], vocab.N), -1, dtype=torch.long)
    if bool(visual.any()):
        j, c = vocab.id_to_code(expanded[visual, : vocab.N])
        if bool((j != torch.arange(vocab.N)).any()):
            raise ValueError("a visual block's slot j holds a code of another sub-codebook")
        codes[visual] = c
    return torch.where(visual, torch.full_like(first, -1), first), codes


def expanded_from_blocks(tokens: torch.Tensor, codes: torch.Tensor, vocab) -> torch.Tensor:
    """Kit blocks -> the official ``[L, N+1]`` layout (``<eob>`` = ``vocab.eob``)."""
    out = torch.full((tokens.shape[0], vocab.N + 1), vocab.eob, dtype=torch.long)
    visual = tokens < 0
    out[~visual, 0] = tokens[~visual]
    out[visual, : vocab.N] = vocab.code_to_id(codes[visual])
    return out


def official_decoder_outputs(lm, h: torch.Tensor, expanded: torch.Tensor) -> torch.Tensor:
    """Block-decoder outputs ``[L, N+1, D]`` under the release's teacher forcing: position i reads
    ``h_i``, then the N slot embeddings of block i+1 (a text block's token repeated N times, as the
    release embeds it; the last position wraps around to block 0, as the release's ``roll`` does)."""
    table = lm.backbone.get_input_embeddings()
    N = lm.vocab.N
    nxt = torch.roll(expanded, -1, 0)[:, :N]
    text = ~lm.vocab.is_visual(nxt[:, 0])
    ids = torch.where(text[:, None], nxt[:, :1].expand(-1, N), nxt)
    x = torch.cat([h[:, None], table(ids).to(h.dtype)], 1)
    return lm.decoder(x)
