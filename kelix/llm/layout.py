"""Block sequences: the chat template, interleaved segments and the visual processor (paper 4.3.1).

A document becomes a list of blocks. A text block is one text id (``{t, eob}``); a visual block is
one patch of an image's code grid (``{c_0..c_{N-1}, eob}``). ``<|eob|>`` is implied by the block kind
and never stored. An image of code grid ``[h, w, N]`` becomes::

    <|vision_start|>
    <|mm_pos_start|> r,c <|mm_pos_end|>  w visual blocks      (for each row r = 0..h-1)
    <|vision_end|>

where the marker text (``"{row},{cols}"`` by default: the row index and the row's width) is
tokenized as ordinary text blocks. The same layout serves understanding (image in a user turn) and
generation (image in the assistant turn).

``messages`` use ChatML (as Qwen3): ``<|im_start|>{role}\\n{content}<|im_end|>\\n``. With
``completion_only`` only the assistant's content and its ``<|im_end|>`` are training targets
(paper 4.3.3, stage 2.2 on); otherwise every block but a document's first is one. Under
``completion_only`` a caption (``segments`` of task ``caption``, e.g. img2dataset's image + txt) is laid
out as ``user: image -> assistant: caption`` (:func:`caption_as_chat`): only the caption is a target,
never its image (that would be unconditional image generation in understanding data).

Text-to-image samples and generation share one prompt layout, :meth:`Layout.t2i_prompt`; the
unconditional prompt of classifier-free guidance is ``t2i_prompt("")``, which is what
:func:`drop_prompt` trains (the processor's ``prompt_dropout``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from kelix.data.schema import Part, Sample, SampleError, Turn
from kelix.llm.vocab import DOC_END, SPECIAL_TOKENS, special_ids

VISUAL = -1  # the text id stored for a visual block


@dataclass
class ImageRef:
    """An image placed in a document: its grid, where its blocks are, and its codes or pixels.

    ``positions`` are the block indices of its ``h*w`` visual blocks in raster order (row-major);
    ``start`` and ``end`` those of its ``<|vision_start|>`` and ``<|vision_end|>`` blocks.
    """

    h: int
    w: int
    positions: list[int]
    start: int = 0
    end: int = 0
    codes: torch.Tensor | None = None  # [h, w, N] long
    pixels: torch.Tensor | None = None  # [3, H, W], to be encoded by the image tokenizer
    target: bool = False  # the image's blocks are training targets (a generated image)


@dataclass
class BlockDoc:
    """One document as blocks: ``tokens[i]`` is a text id or :data:`VISUAL`; ``targets[i]`` says
    whether block i is trained (predicted from block i-1's hidden state)."""

    tokens: list[int] = field(default_factory=list)
    targets: list[bool] = field(default_factory=list)
    images: list[ImageRef] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    def add_text(self, ids: list[int], train: bool):
        self.tokens.extend(ids)
        self.targets.extend([train] * len(ids))

    def codes(self, N: int) -> torch.Tensor:
        """``[L, N]`` codes: -1 for text blocks, 0 where an image still has to be encoded."""
        out = torch.full((len(self.tokens), N), -1, dtype=torch.long)
        for img in self.images:
            pos = torch.tensor(img.positions, dtype=torch.long)
            out[pos] = img.codes.reshape(-1, N).long() if img.codes is not None else 0
        return out


class Layout:
    """Turns samples into :class:`BlockDoc` s with one (extended) text tokenizer.

    Args:
        tokenizer: a text tokenizer extended by :func:`kelix.llm.vocab.extend_text_tokenizer`.
        row_marker: text between ``<|mm_pos_start|>`` and ``<|mm_pos_end|>`` of each row; fields
            ``{row}`` (0-based), ``{row1}`` (1-based), ``{rows}`` (h) and ``{cols}`` (w). The paper's
            example ``3,4`` reads "3rd row of a 4-column grid", i.e. ``{row1},{cols}``; the kit's
            default is ``{row},{cols}``. For a converted release, use what its processor wrote.
        eob_id: an existing id used as ``<eob>`` (see :func:`~kelix.llm.vocab.extend_text_tokenizer`).
        doc_end: appended to ``segments`` documents so the model learns where a document ends
            (skipped if the tokenizer lacks it).
    """

    def __init__(self, tokenizer, row_marker: str = "{row},{cols}", doc_end: str | None = DOC_END,
                 eob_id: int | None = None):
        self.tok = tokenizer
        self.ids = special_ids(tokenizer, eob_id)
        self.row_marker = row_marker
        self.doc_end = tokenizer.get_vocab().get(doc_end) if doc_end else None
        self._text_cache: dict[str, list[int]] = {}

    def text(self, s: str) -> list[int]:
        """Token ids of ``s`` (special token strings are recognised)."""
        if s not in self._text_cache or len(self._text_cache) > 4096:
            if len(self._text_cache) > 4096:
                self._text_cache.clear()
            self._text_cache[s] = list(self.tok(s, add_special_tokens=False)["input_ids"])
        return self._text_cache[s]

    def add_image(self, doc: BlockDoc, h: int, w: int, train: bool, codes=None, pixels=None) -> ImageRef:
        """Append an image's blocks (markers and visual blocks) to ``doc``; return its reference."""
        start = len(doc)
        doc.add_text([self.ids["vision_start"]], train)
        positions = []
        for r in range(h):
            marker = self.row_marker.format(row=r, row1=r + 1, rows=h, cols=w)
            doc.add_text([self.ids["mm_pos_start"], *self.text(marker), self.ids["mm_pos_end"]], train)
            positions.extend(range(len(doc), len(doc) + w))
            doc.add_text([VISUAL] * w, train)
        end = len(doc)
        doc.add_text([self.ids["vision_end"]], train)
        ref = ImageRef(h, w, positions, start, end, codes=codes, pixels=pixels, target=train)
        doc.images.append(ref)
        return ref

    def chat_header(self, role: str) -> list[int]:
        return self.text(f"{SPECIAL_TOKENS['im_start']}{role}\n")

    def t2i_prompt(self, prompt: str) -> list[int]:
        """The blocks before a generated image: ``user: prompt`` then the assistant header. ``build``
        lays a one-round t2i sample out the same way; ``""`` gives CFG's unconditional prompt."""
        return (self.chat_header("user") + self.text(prompt) + [self.ids["im_end"]] + self.text("\n")
                + self.chat_header("assistant"))

    def build(self, sample: Sample, image_fn, completion_only: bool = False) -> BlockDoc:
        """Lay out a sample. ``image_fn(image, role) -> (h, w, codes|None, pixels|None)`` prepares
        each image (``role`` is None in ``segments``); it may raise :class:`SampleError`."""
        doc = BlockDoc()
        where = f"{sample.shard}:{sample.key}"
        if completion_only and sample.kind == "segments" and sample.task == "caption":
            sample = caption_as_chat(sample)
        if sample.kind == "messages":
            for turn in sample.turns:
                train = turn.role == "assistant" or not completion_only
                doc.add_text(self.chat_header(turn.role), not completion_only)
                self._parts(doc, turn.parts, train, turn.role, image_fn)
                doc.add_text([self.ids["im_end"]], train)
                doc.add_text(self.text("\n"), not completion_only)
        else:
            self._parts(doc, sample.turns[0].parts, True, None, image_fn)
            if self.doc_end is not None:
                doc.add_text([self.doc_end], True)
        if len(doc) < 2:
            raise SampleError("empty", f"{where}: fewer than 2 blocks after layout")
        doc.targets[0] = False  # nothing in the document predicts its first block
        if not any(doc.targets):
            raise SampleError("no_targets", f"{where}: no block is a training target (completion-only mask)")
        return doc

    def _parts(self, doc: BlockDoc, parts, train: bool, role, image_fn):
        for p in parts:
            if p.type == "text":
                doc.add_text(self.text(p.text), train)
            else:
                h, w, codes, pixels = image_fn(p.image, role)
                self.add_image(doc, h, w, train, codes=codes, pixels=pixels)


def caption_as_chat(sample: Sample) -> Sample:
    """A caption's ``segments`` as ``user: parts up to its last image -> assistant: the text after``."""
    parts = sample.turns[0].parts
    last = max((i for i, p in enumerate(parts) if p.type == "image"), default=None)
    if last is None:  # no image: plain text, trained as such
        return sample
    answer = parts[last + 1:]
    if not any(p.text for p in answer):
        raise SampleError("no_targets", f"{sample.shard}:{sample.key}: caption has no text after its last image "
                                        "(completion_only trains only the caption)")
    return replace(sample, kind="messages", turns=[Turn("user", parts[:last + 1]), Turn("assistant", answer)])


def is_t2i(sample: Sample) -> bool:
    """Text-to-image: chat turns where an assistant turn holds an image and no other turn does."""
    if sample.kind != "messages":
        return False
    has = [any(p.type == "image" for p in t.parts) for t in sample.turns]
    return any(h for h, t in zip(has, sample.turns) if t.role == "assistant") and \
        not any(h for h, t in zip(has, sample.turns) if t.role != "assistant")


def drop_prompt(sample: Sample) -> Sample:
    """A t2i sample without its prompt: system turns removed, each user turn emptied. A one-round
    sample then starts with ``t2i_prompt("")``, the unconditional prompt of generation's CFG."""
    turns = [Turn("user", [Part("text", text="")]) if t.role == "user" else t
             for t in sample.turns if t.role != "system"]
    return replace(sample, turns=turns)


def t2i_doc(layout: Layout, prompt: str, codes: torch.Tensor) -> tuple[BlockDoc, ImageRef]:
    """The text-to-image chat document (user: prompt; assistant: the image), as generation sees it."""
    doc = BlockDoc()
    doc.add_text(layout.t2i_prompt(prompt), False)
    h, w = int(codes.shape[0]), int(codes.shape[1])
    ref = layout.add_image(doc, h, w, True, codes=codes)
    doc.add_text([layout.ids["im_end"]], True)
    return doc, ref
