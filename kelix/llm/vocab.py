"""The unified vocabulary: text ids, the special tokens of the block layout, and S = N*K visual ids.

Layout of the LLM's embedding table and LM head (rows)::

    [0, visual_offset)                         text ids (the text tokenizer + its added specials,
                                               padded up to the backbone's original row count)
    [visual_offset + j*K, visual_offset + (j+1)*K)   sub-codebook j (j = 0..N-1)

Code ``c`` of sub-codebook ``j`` is id ``visual_offset + j*K + c`` (docs/architecture.md, "Interfaces").
The specials (``<|eob|>``, ``<|vision_start|>``, ``<|vision_end|>``, ``<|mm_pos_start|>``,
``<|mm_pos_end|>`` and the ChatML ``<|im_start|>``/``<|im_end|>``) are text-tokenizer tokens, so they
sit below ``visual_offset``; visual ids are never tokenizer entries (65,536 added tokens would slow
the tokenizer down for nothing).

Slots are 0-based here (the paper's ``t^1..t^M`` are ``slot 0..M-1``): a text block is
``{t, eob}`` (slots 0, 1), a visual block ``{c_0..c_{N-1}, eob}`` (slots 0..N). What each slot may
hold is fixed, which the block decoder uses to compute only the legal rows of the LM head:

* slot 0 of any block: a text id (not ``<|eob|>``) or a code of sub-codebook 0; the choice fixes
  the block's kind;
* slot j (1..N-1) of a visual block: a code of sub-codebook j;
* the last slot: ``<|eob|>`` (deterministic given the kind, so never sampled or trained).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# name -> token text. Qwen tokenizers already hold the vision and ChatML tokens; they are reused.
SPECIAL_TOKENS = {
    "eob": "<|eob|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "mm_pos_start": "<|mm_pos_start|>",
    "mm_pos_end": "<|mm_pos_end|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
}
DOC_END = "<|endoftext|>"


def extend_text_tokenizer(tok, eob_id: int | None = None):
    """Add the block-layout specials the tokenizer lacks (idempotent; the same base gives the same ids).
    ``eob_id``: an existing id serves as ``<eob>`` (the release's ``q_eos``), so ``<|eob|>`` is not added."""
    if eob_id is not None and eob_id < 0:
        raise ValueError(f"lm.eob_token_id {eob_id} is negative")
    # it may lie past the tokenizer's own ids (a padding row of the text table, trained as the release's
    # q_eos): Vocab.build checks that it is below visual_offset
    want = [t for k, t in SPECIAL_TOKENS.items() if not (k == "eob" and eob_id is not None)]
    missing = [t for t in want if t not in tok.get_vocab()]
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    return tok


def special_ids(tok, eob_id: int | None = None) -> dict[str, int]:
    """Ids of :data:`SPECIAL_TOKENS` in an extended tokenizer (raises if one is missing); ``eob_id``
    overrides ``<|eob|>``'s (see :func:`extend_text_tokenizer`)."""
    vocab = tok.get_vocab()
    names = {k: t for k, t in SPECIAL_TOKENS.items() if not (k == "eob" and eob_id is not None)}
    missing = [t for t in names.values() if t not in vocab]
    if missing:
        raise ValueError(f"text tokenizer lacks {missing}: call kelix.llm.vocab.extend_text_tokenizer first")
    return {k: vocab[t] for k, t in names.items()} | ({"eob": eob_id} if eob_id is not None else {})


@dataclass(frozen=True)
class Vocab:
    """The extended vocabulary of a Kelix LLM.

    Args:
        visual_offset: first visual id (= number of text rows of the embedding table).
        N: sub-codebooks per visual token.
        K: entries per sub-codebook.
        eob: ``<|eob|>``, the end-of-block token.
        vision_start: ``<|vision_start|>``, opens an image.
        vision_end: ``<|vision_end|>``, closes an image.
        mm_pos_start: ``<|mm_pos_start|>``, opens a row marker.
        mm_pos_end: ``<|mm_pos_end|>``, closes a row marker.
        im_start: ``<|im_start|>``, opens a chat turn.
        im_end: ``<|im_end|>``, closes a chat turn.
    """

    visual_offset: int
    N: int
    K: int
    eob: int
    vision_start: int
    vision_end: int
    mm_pos_start: int
    mm_pos_end: int
    im_start: int
    im_end: int

    @classmethod
    def build(cls, tok, visual_offset: int, N: int, K: int, eob_id: int | None = None) -> Vocab:
        ids = special_ids(tok, eob_id)
        too_big = {k: v for k, v in ids.items() if v >= visual_offset}
        if too_big:
            raise ValueError(f"special ids {too_big} are not below visual_offset {visual_offset}")
        return cls(visual_offset=visual_offset, N=N, K=K, **ids)

    @property
    def S(self) -> int:
        """Visual ids in all: N*K."""
        return self.N * self.K

    @property
    def size(self) -> int:
        """Rows of the embedding table and LM head."""
        return self.visual_offset + self.S

    # -- id <-> code maps
    def code_to_id(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[..., N]`` (0..K-1, sub-codebook j in column j) -> LLM ids ``[..., N]``."""
        j = torch.arange(self.N, device=codes.device, dtype=torch.long)
        return self.visual_offset + j * self.K + codes.long()

    def id_to_code(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LLM visual ids -> ``(sub-codebook j, code c)``; raises on a non-visual id."""
        rel = ids.long() - self.visual_offset
        if bool(((rel < 0) | (rel >= self.S)).any()):
            raise ValueError(f"ids outside the visual range [{self.visual_offset}, {self.size})")
        return rel // self.K, rel % self.K

    def is_visual(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.visual_offset) & (ids < self.size)

    # -- what each slot may hold
    def slot_range(self, slot: int) -> tuple[int, int]:
        """Legal ids ``[lo, hi)`` of ``slot`` of a visual block (slot 0: also any text id but eob)."""
        if slot == 0:
            return 0, self.visual_offset + self.K
        if 1 <= slot < self.N:
            lo = self.visual_offset + slot * self.K
            return lo, lo + self.K
        if slot == self.N:
            return self.eob, self.eob + 1
        raise ValueError(f"slot {slot} out of range 0..{self.N}")

    def slot_ranges(self, kind: str) -> list[tuple[int, int]]:
        """Per-slot legal ``[lo, hi)`` ranges of a block of ``kind``.

        ``kind``: ``"text"`` (``[(0, visual_offset), (eob, eob+1)]``), ``"visual"`` (N code ranges,
        then eob) or ``"any"`` (a block whose kind is not chosen yet: slot 0 may be either; a
        generator samples slot 0 in this range, then continues with the kind it picked).
        ``<|eob|>`` lies inside the text range but is never legal in slot 0 (see :meth:`slot0_banned`).
        """
        eob = (self.eob, self.eob + 1)
        if kind == "text":
            return [(0, self.visual_offset), eob]
        if kind == "visual":
            return [(self.visual_offset + j * self.K, self.visual_offset + (j + 1) * self.K) for j in range(self.N)] + [eob]
        if kind == "any":
            return [self.slot_range(0)]
        raise ValueError(f"block kind {kind!r} is not 'text', 'visual' or 'any'")

    def layout_specials(self) -> list[int]:
        """The specials of the block layout itself (a text answer never holds them)."""
        return [self.eob, self.vision_start, self.vision_end, self.mm_pos_start, self.mm_pos_end]

    def slot0_banned(self) -> list[int]:
        """Ids inside slot 0's range that can never start a block."""
        return [self.eob]

    def block_size(self, kind: str) -> int:
        """M: 2 for a text block, N+1 for a visual block (``<|eob|>`` included)."""
        return 2 if kind == "text" else self.N + 1

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}
