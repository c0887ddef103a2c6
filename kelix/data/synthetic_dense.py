"""A synthetic text-rich task where one code per merged patch is a real bottleneck (``dense`` shards).

Each image holds :data:`LINES` lines of :data:`LINE_CHARS` digits, one glyph per 14 px ViT patch
(:data:`GLYPH_CELL`), the block of glyphs aligned to the 28 px merged-patch grid: every merged patch
the text covers holds 2 x 2 = 4 digits, 10^4 = 10,000 possibilities, about 13.3 bits. A tokenizer with
one code of S = 256 per merged patch carries 8 bits and cannot tell them apart; N = 4 codes of K = 64
(24 bits) or continuous features can. The question asks for the digits, the answer is the lines read
top to bottom joined by a space ("4719 2830"); digits are single tokens of the ``builtin:synthetic`` text
tokenizer.

Held-out split: a string belongs to the evaluation split when ``crc32(answer) % HELD_OUT_MOD == 0``;
training shards draw only the other strings (:func:`dense_sample` ``split="train"``), the benchmark
(:mod:`kelix.eval.synthetic_dense`) only these, so no benchmark answer is ever a training answer.
"""

from __future__ import annotations

import random
import zlib

from PIL import Image, ImageDraw, ImageFont

ALPHABET = "0123456789"
LINES, LINE_CHARS = 2, 4  # 2 lines of 4 digits: a 2 x 2 block of merged patches, 4 digits each
GLYPH_CELL, GLYPH_FONT = 14, 14  # one glyph per ViT patch (patch 14), its font size in pixels
MERGED = 2 * GLYPH_CELL  # the merged patch (patch 14, merge 2)
SIDE = 140  # image side: 5 x 5 merged patches, within the quickstart's pixel budget (never resized)
HELD_OUT_MOD = 8  # 1 string in 8 is held out for the benchmark
QUESTION = "What digits are in the image?"
INKS = ((0, 0, 0), (30, 30, 120), (120, 20, 20))
PAPERS = ((250, 250, 250), (235, 235, 220), (255, 245, 230))


def is_held_out(answer: str) -> bool:
    """The string belongs to the evaluation split (never drawn for training shards)."""
    return zlib.crc32(answer.encode()) % HELD_OUT_MOD == 0


def random_answer(rng: random.Random, split: str = "train") -> str:
    """``LINES`` lines of ``LINE_CHARS`` digits joined by spaces, from ``split`` (``train`` or ``eval``)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split {split!r} is not train or eval")
    while True:
        answer = " ".join("".join(rng.choice(ALPHABET) for _ in range(LINE_CHARS)) for _ in range(LINES))
        if is_held_out(answer) == (split == "eval"):
            return answer


def glyph_boxes(col: int, row: int) -> list[list[tuple[int, int, int, int]]]:
    """Per line, per character: the ``(x0, y0, x1, y1)`` ViT patch the glyph sits in, for a text block whose
    top-left merged patch is ``(col, row)``."""
    x0, y0 = col * MERGED, row * MERGED
    return [[(x0 + c * GLYPH_CELL, y0 + r * GLYPH_CELL, x0 + (c + 1) * GLYPH_CELL, y0 + (r + 1) * GLYPH_CELL)
             for c in range(LINE_CHARS)] for r in range(LINES)]


def render_dense(answer: str, rng: random.Random, side: int = SIDE) -> tuple[Image.Image, tuple[int, int]]:
    """The image of ``answer`` and the merged patch ``(col, row)`` where its block starts: each glyph is
    centred in its own 14 px patch, the block anywhere on the 28 px grid."""
    lines = answer.split(" ")
    if len(lines) != LINES or any(len(line) != LINE_CHARS for line in lines):
        raise ValueError(f"{answer!r} is not {LINES} lines of {LINE_CHARS} characters")
    img = Image.new("RGB", (side, side), rng.choice(PAPERS))
    draw, font, ink = ImageDraw.Draw(img), ImageFont.load_default(size=GLYPH_FONT), rng.choice(INKS)
    cells = side // MERGED
    span = -(-LINE_CHARS * GLYPH_CELL // MERGED), -(-LINES * GLYPH_CELL // MERGED)  # merged patches covered
    col, row = rng.randint(0, cells - span[0]), rng.randint(0, cells - span[1])
    for line, boxes in zip(lines, glyph_boxes(col, row)):
        for ch, (x0, y0, _, _) in zip(line, boxes):
            left, top, right, bottom = draw.textbbox((0, 0), ch, font=font)
            x = x0 + (GLYPH_CELL - (right - left)) // 2 - left
            y = y0 + (GLYPH_CELL - (bottom - top)) // 2 - top
            draw.text((x, y), ch, font=font, fill=ink)
    return img, (col, row)


def dense_sample(rng: random.Random, size: tuple[int, int] | None = None,
                 split: str = "train") -> tuple[dict, list[Image.Image]]:
    """One ``dense`` sample (the :func:`kelix.data.synthetic.make_sample` contract): question, answer, image.
    ``size`` is unused: the image is always :data:`SIDE` square, so it is never resized (a resize would
    move glyphs off their patches)."""
    answer = random_answer(rng, split)
    img, _ = render_dense(answer, rng)
    msgs = [{"role": "user", "content": [{"type": "image", "image": "0.jpg"}, {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": answer}]
    return {"task": "ocr", "messages": msgs}, [img]  # schema task: reading text (shards keep the name dense)
