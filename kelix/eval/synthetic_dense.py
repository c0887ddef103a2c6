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
