"""Visual input embeddings of stage 1 (paper 4.3.2) and their folding into one table (4.3.3).

Stage 1 embeds a visual block with the frozen tokenizer and a trainable linear up-projector:
``E = W2 (W1 fuse_j(v_j,c_j) + b1) + b2``, where ``v`` are the tokenizer's code vectors,
``(W1, b1)`` its up-projector and ``(W2, b2)`` the LLM's. Because every map is linear, the same value
is a sum of per-code rows::

    row(j, c) = W2 W1 v_jc * s + (W2 b1 + b2) / N        (s = 1 for sum fusion, 1/N for mean)

:class:`VisualProjector` computes exactly these rows, so the block encoder (Eq. 4: sum of the block's
token embeddings) gives stage 1's input, and the block decoder's teacher-forced inputs are the same
per-code embeddings stage 2 will use. Embedding unification writes ``row(j, c)`` into the LLM's table
at id ``visual_offset + j*K + c`` (:meth:`VisualProjector.table`): inputs are unchanged by folding.
"""

from __future__ import annotations

import torch
from torch import nn


class VisualProjector(nn.Module):
    """Per-code visual embeddings from frozen code vectors and two up-projectors.

    Args:
        code_vectors: ``[N, K, d]`` the tokenizer's code vectors (kept frozen, as a buffer).
        out_dim: width of the tokenizer's up-projector output.
        hidden: the LLM's hidden size D.
        fusion: the tokenizer's fusion of the N vectors, ``sum`` or ``mean``.
    """

    def __init__(self, N: int, K: int, d: int, out_dim: int, hidden: int, fusion: str = "sum"):
        super().__init__()
        if fusion not in ("sum", "mean"):
            raise ValueError(f"fusion {fusion!r} is not sum or mean")
        self.N, self.K, self.fusion = N, K, fusion
        self.register_buffer("code_vectors", torch.zeros(N, K, d))
        self.tok_up = nn.Linear(d, out_dim)  # the tokenizer's up-projector: frozen
        self.tok_up.requires_grad_(False)
        self.up_projector = nn.Linear(out_dim, hidden)  # stage 1's trainable aligner

    @classmethod
    def from_tokenizer(cls, tokenizer, hidden: int) -> VisualProjector:
        """Copy the code vectors and up-projector of a :class:`~kelix.tokenizer.model.KelixTokenizer`."""
        cv = tokenizer.code_vectors().detach().float()
        N, K, d = cv.shape
        out = cls(N, K, d, tokenizer.up_projector.out_features, hidden, tokenizer.config.fusion)
        with torch.no_grad():
            out.code_vectors.copy_(cv)
            out.tok_up.load_state_dict(tokenizer.up_projector.state_dict())
        return out

    @property
    def scale(self) -> float:
        return 1.0 if self.fusion == "sum" else 1.0 / self.N

    def rows(self, slot: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """``row(j, c)`` for sub-codebook ``slot`` and ``code`` (same shapes) -> ``[..., D]``."""
        v = self.code_vectors[slot, code]
        x = nn.functional.linear(v * self.scale, self.tok_up.weight)  # W1 v s (the bias is folded below)
        bias = (self.up_projector(self.tok_up.bias)) / self.N  # (W2 b1 + b2) / N
        return nn.functional.linear(x, self.up_projector.weight) + bias

    def block(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[..., N]`` -> the block's input embedding ``[..., D]`` (the sum of its rows)."""
        j = torch.arange(self.N, device=codes.device).expand_as(codes)
        return self.rows(j, codes).sum(-2)

    @torch.no_grad()
    def table(self) -> torch.Tensor:
        """All ``S = N*K`` rows ``[S, D]`` in id order (``j*K + c``): the folded image embedding table."""
        j = torch.arange(self.N, device=self.code_vectors.device).repeat_interleave(self.K)
        c = torch.arange(self.K, device=self.code_vectors.device).repeat(self.N)
        return self.rows(j, c)
