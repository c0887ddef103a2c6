"""Visual input embeddings of stage 1 (paper 4.3.2) and their folding into one table (4.3.3).

Stage 1 embeds a visual block with the frozen tokenizer and a trainable linear up-projector:
``E = W2 (s * W1 concat_j(v_j,c_j) + b1) + b2``, where ``v`` are the tokenizer's code vectors,
``(W1 [out, N*d], b1)`` its up-projection as one linear map of the concatenated slots
(:meth:`~kelix.tokenizer.model.KelixTokenizer.slot_projection`: slot j's matrix is the column block
``W1_j``; a ``shared`` projection repeats one matrix), ``s`` the fusion scale and ``(W2, b2)`` the
LLM's. Because every map is linear, the same value is a sum of per-code rows::

    row(j, c) = W2 W1_j v_jc * s + (W2 b1 + b2) / N        (s = 1 for sum fusion, 1/N for mean)

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
        N: sub-codebooks.
        K: codes per sub-codebook.
        d: code vector width (the tokenizer's ``code_vectors`` ``[N, K, d]`` are kept frozen, as a buffer).
        out_dim: width of the tokenizer's up-projector output.
        hidden: the LLM's hidden size D.
        fusion: the tokenizer's fusion of the N slots, ``sum`` or ``mean``.
    """

    def __init__(self, N: int, K: int, d: int, out_dim: int, hidden: int, fusion: str = "sum"):
        super().__init__()
        if fusion not in ("sum", "mean"):
            raise ValueError(f"fusion {fusion!r} is not sum or mean")
        self.N, self.K, self.d, self.fusion = N, K, d, fusion
        self.register_buffer("code_vectors", torch.zeros(N, K, d))
        self.tok_up = nn.Linear(N * d, out_dim)  # the tokenizer's up-projection of the N slots: frozen
        self.tok_up.requires_grad_(False)
        self.up_projector = nn.Linear(out_dim, hidden)  # stage 1's trainable aligner

    @classmethod
    def from_tokenizer(cls, tokenizer, hidden: int) -> VisualProjector:
        """Copy the code vectors and up-projection of a :class:`~kelix.tokenizer.model.KelixTokenizer`."""
        cv = tokenizer.code_vectors().detach().float()
        N, K, d = cv.shape
        weight, bias = tokenizer.slot_projection()
        out = cls(N, K, d, weight.shape[0], hidden, tokenizer.config.fusion)
        with torch.no_grad():
            out.code_vectors.copy_(cv)
            out.tok_up.weight.copy_(weight)
            out.tok_up.bias.copy_(bias)
        return out

    @torch.no_grad()
    def standardize(self, target_norm: float, samples: int = 1024, seed: int = 0) -> None:
        """Start the trainable up-projector so the codebook's average block embeds to zero and a block's
        embedding has norm ``target_norm`` on average (blocks of uniformly drawn codes).

        Why: a tokenizer's code vectors share a large common direction (a random quickstart tokenizer:
        cosine 0.96 between its blocks' embeddings, whose norm was 40x the text rows'), so with the
        default init every visual position starts as nearly the same, very long vector in the residual
        stream, and learning to tell blocks apart takes many steps. The map stays linear (foldable)."""
        g = torch.Generator().manual_seed(seed)
        cv = self.code_vectors * self.scale  # [N, K, d]
        mean_block = self.tok_up(cv.mean(1).flatten())  # W1 s concat_j(mean_c v_jc) + b1
        codes = torch.randint(self.K, (samples, self.N), generator=g)
        x = self.tok_up(cv[torch.arange(self.N), codes].flatten(-2)) - mean_block
        spread = nn.functional.linear(x, self.up_projector.weight).norm(dim=-1).mean().clamp(min=1e-8)
        self.up_projector.weight.mul_(target_norm / spread)
        self.up_projector.bias.copy_(-nn.functional.linear(mean_block, self.up_projector.weight))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # stage-1 models written before per-slot projections hold one shared W1 [out, d]: the same map
        # as W1 repeated for every slot
        key = prefix + "tok_up.weight"
        w = state_dict.get(key)
        if w is not None and w.ndim == 2 and w.shape[1] == self.d and self.N > 1:
            state_dict[key] = w.repeat(1, self.N)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def scale(self) -> float:
        return 1.0 if self.fusion == "sum" else 1.0 / self.N

    def _bias(self) -> torch.Tensor:
        return self.up_projector(self.tok_up.bias) / self.N  # (W2 b1 + b2) / N

    def rows(self, slot: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """``row(j, c)`` for sub-codebook ``slot`` and ``code`` (broadcast shapes) -> ``[..., D]``."""
        slot, code = torch.broadcast_tensors(slot, code)
        v = self.code_vectors[slot, code] * self.scale  # [..., d]
        # v in slot j's block of an otherwise zero [N*d] vector: W1 of it is W1_j v (no sync, no per-row matrix)
        # one_hot by comparison: F.one_hot range-checks its input with .item() off CUDA (a sync per step)
        onehot = (slot[..., None] == torch.arange(self.N, device=slot.device)).to(v.dtype)  # [..., N]
        x = nn.functional.linear((onehot[..., None] * v[..., None, :]).flatten(-2), self.tok_up.weight)
        return nn.functional.linear(x, self.up_projector.weight) + self._bias()

    def block(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[..., N]`` -> the block's input embedding ``[..., D]`` (the sum of its rows)."""
        v = self.code_vectors[torch.arange(self.N, device=codes.device), codes] * self.scale  # [..., N, d]
        return self.up_projector(self.tok_up(v.flatten(-2)))  # W2 (W1 s concat(v) + b1) + b2

    @torch.no_grad()
    def table(self) -> torch.Tensor:
        """All ``S = N*K`` rows ``[S, D]`` in id order (``j*K + c``): the folded image embedding table."""
        d, out = self.d, []
        for j in range(self.N):  # slot by slot: W1_j is a column block of W1
            x = nn.functional.linear(self.code_vectors[j] * self.scale, self.tok_up.weight[:, j * d:(j + 1) * d])
            out.append(nn.functional.linear(x, self.up_projector.weight) + self._bias())
        return torch.cat(out)


class ContinuousProjector(nn.Module):
    """Stage 1's aligner for the continuous baseline (Table 6a; tokenizer ``quantizer: none``): the
    tokenizer's features ``[..., out_dim]`` (merger -> its up-projector) -> the LLM width. There are no
    codes, so nothing folds into the embedding table: the projector stays in every later stage.

    Args:
        out_dim: width of the tokenizer's features.
        hidden: the LLM's hidden size D.
    """

    def __init__(self, out_dim: int, hidden: int):
        super().__init__()
        self.up_projector = nn.Linear(out_dim, hidden)
        # set once the projector has been standardized on real features (saved: a loaded one is not redone)
        self.register_buffer("standardized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def standardize(self, features: torch.Tensor, target_norm: float) -> None:
        """Start the projector so ``features [T, out_dim]`` (a batch of real images) embed around zero with
        mean norm ``target_norm``: :meth:`VisualProjector.standardize` for features that only real images
        give (their common direction would otherwise dominate the residual stream, as codes' did)."""
        x = features.float()
        mean = x.mean(0)
        w = self.up_projector.weight
        spread = nn.functional.linear(x - mean, w.float()).norm(dim=-1).mean().clamp(min=1e-8)
        w.mul_(target_norm / spread)
        self.up_projector.bias.copy_(-nn.functional.linear(mean, w.float()).to(w.dtype))
        self.standardized.fill_(True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.up_projector(features.to(self.up_projector.weight.dtype))
