"""The synthetic benchmark suite: held-out splits of the kit's synthetic world with exact answers.

* ``synthetic-vqa``: colour, shape and count questions about scenes of shapes; exact match after the
  VQA normalisation ("Two" = "2" = "two");
* ``synthetic-ocr``: rendered words; exact match and character accuracy (1 - CER, torchmetrics);
* ``synthetic-t2i``: prompts such as "two blue squares"; the generated image is scored by the
  deterministic checker of :mod:`kelix.eval.t2i_check`.

Each split is drawn from its own random stream (``kelix-eval:<seed>:<task>``); training shards draw
from ``<seed>:<task>:<shard>``, so no benchmark image is a training image. The answer vocabulary
(colours, shapes, words) is the world's own and is shared by design. Files, per benchmark:
``<dir>/<name>/data.jsonl`` (``id``, ``image``, ``question``, ``answer``, ``category``; t2i rows have
``prompt``, ``color``, ``count``, ``shape``) and ``<dir>/<name>/images/<id>.png``.
"""

from __future__ import annotations

import json
import os
import random

from kelix.data.synthetic import COLORS, IMAGE_SIZE, PLURAL, make_sample, random_t2i, render_t2i, t2i_text
from kelix.eval.answers import normalize_answer
from kelix.eval.base import Benchmark, DataError, Item, load_image, mean_scores, register, where
from kelix.eval.t2i_check import check_image

SYNTHETIC = ("synthetic-vqa", "synthetic-ocr", "synthetic-t2i")
DEFAULT_SEED = 12345


def _rows(task: str, n: int, seed: int, size: tuple[int, int]):
    rng = random.Random(f"kelix-eval:{seed}:{task}")
    for i in range(n):
        if task == "t2i":
            color, count, shape, background = random_t2i(rng)  # as the training t2i task draws them
            picture = render_t2i(color, count, shape, size[1], rng, background)
            text = t2i_text(color, count, shape)
            yield {"id": i, "prompt": text, "color": color, "count": count, "shape": shape}, picture
            continue
        meta, images = make_sample(task, rng, size, turns="one")
        user, assistant = meta["messages"]
        question = next(p["text"] for p in user["content"] if p["type"] == "text")
        category = "ocr" if task == "ocr" else "count" if question.startswith("How many") else \
            "color" if question.startswith("What color") else "shape"
        yield {"id": i, "question": question, "answer": assistant["content"], "category": category}, images[0]


def write_benchmark(name: str, out: str, n: int = 200, seed: int = DEFAULT_SEED,
                    size: tuple[int, int] = IMAGE_SIZE) -> str:
    """Write the held-out split ``name`` (``n`` items) under ``out/name``; return its data.jsonl."""
    if name not in SYNTHETIC:
        raise ValueError(f"unknown synthetic benchmark {name!r}; choose from {', '.join(SYNTHETIC)}")
    root = os.path.join(out, name)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    path = os.path.join(root, "data.jsonl")
    with open(path + ".tmp", "w") as f:
        for row, picture in _rows(name.split("-")[1], n, seed, size):
            row["image"] = f"images/{row['id']:06d}.png"
            picture.save(os.path.join(root, row["image"]))
            f.write(json.dumps(row) + "\n")
    os.replace(path + ".tmp", path)
    return path


def write_benchmarks(out: str, n: int = 200, seed: int = DEFAULT_SEED) -> list[str]:
    return [write_benchmark(name, out, n, seed) for name in SYNTHETIC]


def _read_jsonl(data: str, name: str, fields: tuple[str, ...]) -> tuple[str, list[dict]]:
    path = os.path.join(data, name, "data.jsonl") if os.path.isdir(os.path.join(data, name)) else \
        os.path.join(data, "data.jsonl") if os.path.isdir(data) else data
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file (write it with kelix make-synthetic --benchmarks N)")
    rows = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where(path, i)}: not JSON ({e})") from None
            for k in fields:
                if k not in row:
                    raise DataError(f"{where(path, i, k)}: missing")
            rows.append(row)
    return path, rows


class _Synthetic(Benchmark):
    def read(self, data: str, images: str | None = None) -> list[Item]:
        path, rows = _read_jsonl(data, self.name, ("id", "image", "question", "answer"))
        base = images or os.path.dirname(path)
        return [Item(r["id"], r["question"], r["answer"], [os.path.join(base, r["image"])], r.get("category", ""))
                for r in rows]


@register
class SyntheticVQA(_Synthetic):
    name = "synthetic-vqa"
    files = "<dir>/synthetic-vqa/data.jsonl + images/ (kelix make-synthetic --benchmarks N)"
    metrics = ("acc",)
    max_new_tokens = 8

    def score_item(self, item: Item, prediction: str) -> dict[str, float]:
        return {"acc": float(normalize_answer(prediction) == normalize_answer(item.answer))}


@register
class SyntheticOCR(_Synthetic):
    name = "synthetic-ocr"
    files = "<dir>/synthetic-ocr/data.jsonl + images/ (kelix make-synthetic --benchmarks N)"
    metrics = ("exact", "char_acc")
    max_new_tokens = 24

    def score_item(self, item: Item, prediction: str) -> dict[str, float]:
        from torchmetrics.functional.text import char_error_rate

        pred, gold = str(prediction).strip(), str(item.answer)
        cer = float(char_error_rate(pred, gold))
        return {"exact": float(pred == gold), "char_acc": max(0.0, 1.0 - cer)}

    def aggregate(self, items, scores, predictions):
        """Character accuracy over the corpus (edits summed over items, as CharErrorRate accumulates)."""
        from torchmetrics.text import CharErrorRate

        out = mean_scores(items, scores)
        metric = CharErrorRate()
        for it in items:
            if it.key in scores:
                metric.update(str(predictions[it.key]).strip(), str(it.answer))
        if metric.total > 0:
            out["overall"]["corpus_char_acc"] = max(0.0, 1.0 - float(metric.compute()))
        return out


@register
class SyntheticT2I(Benchmark):
    name = "synthetic-t2i"
    kind = "generate"
    files = "<dir>/synthetic-t2i/data.jsonl (prompt, color, count, shape) (kelix make-synthetic --benchmarks N)"
    metrics = ("overall", "color", "count", "shape")

    def read(self, data: str, images: str | None = None) -> list[Item]:
        path, rows = _read_jsonl(data, self.name, ("id", "prompt", "color", "count", "shape"))
        items = []
        for i, r in enumerate(rows):
            if r["color"] not in COLORS or r["shape"] not in PLURAL or not 1 <= int(r["count"]) <= 4:
                raise DataError(f"{where(path, i)}: color/shape/count {r['color']!r}/{r['shape']!r}/{r['count']!r} "
                                "is not in the synthetic world")
            items.append(Item(r["id"], f"Generate an image of {r['prompt']}.", dict(r),
                              category="count" if int(r["count"]) > 1 else "single"))
        return items

    def generate_item(self, model, item: Item, out: str, seed: int) -> str:
        """Render the prompt, save ``out/images/<id>.png``; the prediction is that path."""
        os.makedirs(os.path.join(out, "images"), exist_ok=True)
        path = os.path.join(out, "images", f"{item.key}.png")
        model.render([item.prompt], seed=seed)[0].save(path)
        return path

    def score_item(self, item: Item, prediction: str) -> dict[str, float]:
        a = item.answer
        return check_image(load_image(prediction, f"prediction of item {item.id}"), a["color"], int(a["count"]),
                           a["shape"])
