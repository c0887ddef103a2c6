"""``synthetic-dense``: the held-out split of the dense-digits task (:mod:`kelix.data.synthetic_dense`).

Items read ``2 x 4`` digits, four per merged patch, where one code per patch is a bottleneck (the
text-rich column of ``kelix ablate``). Scored as ``synthetic-ocr`` is: exact match and character
accuracy (1 - CER), ``corpus_char_acc`` over the split. The split draws only held-out strings
(``crc32 % 8 == 0``), which training shards never hold, from its own stream ``kelix-eval:<seed>:dense``.
Files: ``<dir>/synthetic-dense/data.jsonl`` (``id``, ``image``, ``question``, ``answer``, ``category``)
and ``<dir>/synthetic-dense/images/<id>.png``.
"""

from __future__ import annotations

import json
import os
import random

from kelix.data.synthetic_dense import dense_sample
from kelix.eval.base import register
from kelix.eval.synthetic import DEFAULT_SEED, SyntheticOCR

NAME = "synthetic-dense"


def write_dense_benchmark(out: str, n: int = 200, seed: int = DEFAULT_SEED) -> str:
    """Write ``n`` held-out items under ``out/synthetic-dense``; return its data.jsonl. The first ``n`` rows of
    a longer split are these ``n`` (rows are drawn in order from one stream)."""
    root = os.path.join(out, NAME)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rng = random.Random(f"kelix-eval:{seed}:dense")
    path = os.path.join(root, "data.jsonl")
    with open(path + ".tmp", "w") as f:
        for i in range(n):
            meta, images = dense_sample(rng, split="eval")
            user, assistant = meta["messages"]
            question = next(p["text"] for p in user["content"] if p["type"] == "text")
            row = {"id": i, "image": f"images/{i:06d}.png", "question": question, "answer": assistant["content"],
                   "category": "dense"}
            images[0].save(os.path.join(root, row["image"]))
            f.write(json.dumps(row) + "\n")
    os.replace(path + ".tmp", path)
    return path


@register
class SyntheticDense(SyntheticOCR):
    name = NAME
    files = "<dir>/synthetic-dense/data.jsonl + images/ (kelix.eval.synthetic_dense.write_dense_benchmark)"
    max_new_tokens = 16  # 9 digit/space tokens and the end of the turn


def token_distinctness(tokenizer, n: int = 200, seed: int = DEFAULT_SEED) -> dict[str, float]:
    """How much of the dense task the visual tokens can carry at all, before any LLM reads them.

    ``n`` held-out images are encoded; each merged patch the text covers holds 4 digits (its *content*).
    A patch is confusable when its token (the code tuple; for a continuous tokenizer the feature vector,
    rounded to 1e-3) is also the token of a patch with other content: no reader of the tokens can tell
    those apart. Returns ``distinct`` (the fraction of text patches that are not confusable),
    ``tokens`` (distinct tokens among them) and ``patches``."""
    import torch

    from kelix.data.synthetic_dense import GLYPH_CELL, LINE_CHARS, LINES, MERGED, random_answer, render_dense

    rng = random.Random(f"kelix-eval:{seed}:dense-tokens")
    answers, images, origins = [], [], []
    for _ in range(n):
        answer = random_answer(rng, "eval")
        img, origin = render_dense(answer, rng)
        answers.append(answer.split(" "))
        images.append(img)
        origins.append(origin)
    grids = tokenizer.encode(images) if tokenizer.has_codes else tokenizer.features(images)
    per = MERGED // GLYPH_CELL  # glyphs per merged patch side
    contents: dict[tuple, set] = {}
    keys = []
    for lines, (col, row), grid in zip(answers, origins, grids):
        for mr in range(-(-LINES // per)):
            for mc in range(-(-LINE_CHARS // per)):
                content = "".join(lines[mr * per + r][mc * per:(mc + 1) * per] for r in range(per)
                                  if mr * per + r < LINES)
                tok = grid[row + mr, col + mc]
                key = tuple(tok.tolist()) if tokenizer.has_codes else tuple(torch.round(tok.float() * 1e3).long().tolist())
                contents.setdefault(key, set()).add(content)
                keys.append(key)
    confusable = sum(len(contents[k]) > 1 for k in keys)
    return {"distinct": 1.0 - confusable / len(keys), "tokens": float(len(contents)), "patches": float(len(keys))}
