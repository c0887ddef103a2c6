"""Open-answer benchmarks: OCRBench, TextVQA, ChartQA (release files; images from a folder or inline)."""

from __future__ import annotations

import json
import os
from collections import defaultdict

from kelix.eval.answers import ocrbench_match, relaxed_accuracy, vqa_accuracy
from kelix.eval.base import Benchmark, DataError, Item, register, where
from kelix.eval.tsv import choices_list, read_tsv, row_images

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


def read_json(path: str):
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not JSON ({e})") from None


def _field(row, key: str, path: str, i: int, kind=str):
    if not isinstance(row, dict) or key not in row or row[key] in (None, ""):
        raise DataError(f"{where(path, i, key)}: missing")
    if not isinstance(row[key], kind):
        raise DataError(f"{where(path, i, key)}: expected {getattr(kind, '__name__', kind)}, got {type(row[key]).__name__}")
    return row[key]


def _image_dir(images: str | None, path: str) -> str:
    return images or os.path.dirname(os.path.abspath(path))


OCRBENCH_GROUPS = {"Text Recognition": ("Regular Text Recognition", "Irregular Text Recognition",
                                        "Artistic Text Recognition", "Handwriting Recognition",
                                        "Digit String Recognition", "Non-Semantic Text Recognition")}


@register
class OCRBench(Benchmark):
    """OCRBench: the question as asked; a gold answer inside the prediction; a score out of 1000."""

    name = "ocrbench"
    files = "VLMEvalKit OCRBench.tsv, or the release OCRBench.json (+ --images OCRBench_Images)"
    metrics = ("score", "acc")
    max_new_tokens = 64

    def read(self, data, images=None):
        if data.endswith(".tsv"):
            rows = read_tsv(data, ("index", "question", "answer", "category"))
            items = []
            for i, (r, srcs) in enumerate(zip(rows, row_images(rows, data, images))):
                row = {k: v for k, v in r.items() if k != "image"}  # what a prediction file carries
                items.append(Item(int(float(r["index"])), str(r["question"]),
                                  choices_list(r["answer"], where(data, i, "answer")), srcs, str(r["category"]),
                                  {"row": row}))
            return items
        rows, base = read_json(data), _image_dir(images, data)
        if not isinstance(rows, list):
            raise DataError(f"{data}: expected a list of questions")
        items = []
        for i, r in enumerate(rows):
            answers = _field(r, "answers", data, i, (str, list))
            items.append(Item(r.get("id", i), _field(r, "question", data, i), [answers] if isinstance(answers, str)
                              else [str(a) for a in answers], [os.path.join(base, _field(r, "image_path", data, i))],
                              _field(r, "type", data, i)))
        return items

    def score_item(self, item, prediction):
        return {"acc": ocrbench_match(prediction, item.answer, item.category)}

    def aggregate(self, items, scores, predictions):
        correct, total = defaultdict(float), defaultdict(int)
        for it in items:
            if it.key in scores:
                correct[it.category] += scores[it.key]["acc"]
                total[it.category] += 1
        cats = {c: {"correct": correct[c], "acc": correct[c] / total[c]} for c in sorted(total)}
        for group, members in OCRBENCH_GROUPS.items():  # OCRBench reports the six recognition types together
            n = sum(total[m] for m in members)
            if n:
                got = sum(correct[m] for m in members)
                cats[group] = {"correct": got, "acc": got / n}
        n = sum(total.values())
        # the full benchmark has 1000 questions, so "score" is the reference's number out of 1000
        return {"overall": {"score": sum(correct.values()), "acc": sum(correct.values()) / n if n else 0.0},
                "per_category": cats, "count": n}


@register
class TextVQA(Benchmark):
    """TextVQA as lmms-eval 0.7.3 scores it: VQA accuracy over the 10 annotators' answers (EvalAI's
    normalisation, leave-one-out)."""

    name = "textvqa"
    files = "TextVQA_0.5.1_val.json (+ --images train_images, <image_id>.jpg)"
    metrics = ("acc",)
    max_new_tokens = 16

    def read(self, data, images=None):
        doc, base = read_json(data), _image_dir(images, data)
        rows = doc.get("data") if isinstance(doc, dict) else None
        if not isinstance(rows, list):
            raise DataError(f"{where(data, None, 'data')}: missing (expected TextVQA's {{'data': [...]}})")
        items = []
        for i, r in enumerate(rows):
            answers = _field(r, "answers", data, i, list)
            image_id = _field(r, "image_id", data, i)
            # lmms-eval's prompt: the question capitalised (str.capitalize lowers the rest), then the instruction
            items.append(Item(_field(r, "question_id", data, i, (int, str)),
                              _field(r, "question", data, i).capitalize() + SHORT_ANSWER,
                              [str(a) for a in answers], [os.path.join(base, f"{image_id}.jpg")]))
        return items

    def score_item(self, item, prediction):
        return {"acc": vqa_accuracy(prediction, item.answer)}


@register
class ChartQA(Benchmark):
    """ChartQA as lmms-eval 0.7.3 scores it: relaxed accuracy (numbers within 5%, other answers equal ignoring
    case; neither the label nor the prediction is stripped)."""

    name = "chartqa"
    files = "ChartQA test_human.json / test_augmented.json (+ --images test/png)"
    metrics = ("relaxed_acc",)
    max_new_tokens = 16

    def read(self, data, images=None):
        rows, base = read_json(data), _image_dir(images, data)
        if not isinstance(rows, list):
            raise DataError(f"{data}: expected a list of rows (imgname, query, label)")
        category = os.path.splitext(os.path.basename(data))[0]
        return [Item(i, _field(r, "query", data, i) + "\nAnswer the question with a single word.",
                     str(_field(r, "label", data, i, (str, int, float))),
                     [os.path.join(base, _field(r, "imgname", data, i))], category) for i, r in enumerate(rows)]

    def score_item(self, item, prediction):
        return {"relaxed_acc": relaxed_accuracy(prediction, item.answer)}
