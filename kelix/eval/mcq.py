"""VLMEvalKit TSV benchmarks: MMBench EN/CN (circular), SEED-Bench, AI2D, RealWorldQA, MMMU, MathVista.

Prompts as VLMEvalKit builds multiple-choice prompts (``Hint:``, ``Question:``, ``Options:`` lines, then
"Please select the correct answer from the options above."); answers extracted by rules
(:func:`kelix.eval.answers.extract_choice`), never by a GPT judge. MMBench is scored circularly: each
question is asked once per rotation of its options (VLMEvalKit's files already hold the rotations as
``index + k * 1_000_000``; a file without them gets them built here) and counts as right only if every
rotation is answered right.
"""

from __future__ import annotations

import math
from collections import defaultdict

from kelix.eval.answers import LETTERS, extract_choice, last_number, mcq_prompt, normalize_answer
from kelix.eval.base import Benchmark, DataError, Item, register, where
from kelix.eval.tsv import choices_list, is_missing, options_of, read_tsv, row_images

ROTATION = 1_000_000  # VLMEvalKit: index % 1e6 names the question a rotated copy belongs to


class MultipleChoice(Benchmark):
    """A VLMEvalKit multiple-choice TSV (options in columns A, B, ...; ``answer`` a letter)."""

    files = "VLMEvalKit TSV (index, image|image_path, question, hint, A..., answer, category)"
    metrics = ("acc",)
    max_new_tokens = 16
    required = ("index", "question", "answer")

    def read(self, data: str, images: str | None = None) -> list[Item]:
        rows = read_tsv(data, self.required)
        srcs = row_images(rows, data, images)
        return [self.item(r, i, data, s) for i, (r, s) in enumerate(zip(rows, srcs))]

    def item(self, r: dict, i: int, data: str, images: list) -> Item:
        options = options_of(r)
        if len(options) < 2:
            raise DataError(f"{where(data, i, 'A')}: a multiple-choice row needs at least options A and B")
        answer = str(r["answer"]).strip()
        if answer not in options:
            raise DataError(f"{where(data, i, 'answer')}: {answer!r} is not one of the options {''.join(options)}")
        hint = None if is_missing(r.get("hint")) else r["hint"]
        return Item(_int(r["index"]), mcq_prompt(r["question"], options, hint), answer, images,
                    str(r.get("category") or ""), {"options": options, "l2": r.get("l2-category", ""),
                                                    "question": r["question"], "hint": hint})

    def score_item(self, item: Item, prediction: str) -> dict[str, float]:
        letter = extract_choice(prediction, item.meta["options"])
        if letter is None and self.judge is not None:  # VLMEvalKit asks its judge only when the rules fail
            letter = self.judge.choose(item.meta["question"], item.meta["options"], prediction)
        return {"acc": float(letter == item.answer)}


def _int(v):
    try:
        return int(float(v))
    except ValueError:
        return v


def rotations(item: Item) -> list[Item]:
    """The item with its options shifted by 1..n-1 places (ids ``index + k * 1e6``), answers following."""
    opts = item.meta["options"]
    letters, values = list(opts), list(opts.values())
    out = []
    for k in range(1, len(letters)):
        new = {letters[j]: values[(j + k) % len(values)] for j in range(len(values))}
        answer = next(c for c, v in new.items() if v == opts[item.answer])
        question = item.meta["question"]
        out.append(Item(item.id + k * ROTATION, mcq_prompt(question, new, item.meta["hint"]), answer, item.images,
                        item.category, {**item.meta, "options": new}))
    return out


class MMBench(MultipleChoice):
    """MMBench with VLMEvalKit's circular evaluation."""

    metrics = ("acc", "vanilla_acc")

    def item(self, r, i, data, images):
        it = super().item(r, i, data, images)
        if not isinstance(it.id, int):
            raise DataError(f"{where(data, i, 'index')}: {r['index']!r} is not an integer")
        return it

    def read(self, data, images=None):
        items = super().read(data, images)
        if any(it.id >= ROTATION for it in items):
            return items  # the file holds its rotations
        return [x for it in items for x in (it, *rotations(it))]

    def limit(self, items, n):
        """The first ``n`` questions with all their rotations (a partial group would score wrongly)."""
        if n is None:
            return items
        keep = list(dict.fromkeys(it.id % ROTATION for it in items))[:n]
        return [it for it in items if it.id % ROTATION in set(keep)]

    def aggregate(self, items, scores, predictions):
        groups: dict[int, list[float]] = defaultdict(list)
        category, vanilla = {}, []
        for it in items:
            if it.key in scores:
                groups[it.id % ROTATION].append(scores[it.key]["acc"])
                category[it.id % ROTATION] = it.category
                if it.id < ROTATION:
                    vanilla.append(scores[it.key]["acc"])
        # a question counts once, right only when all its rotations are
        right = {g: float(all(v == 1.0 for v in vals)) for g, vals in groups.items()}
        cats: dict[str, list[float]] = defaultdict(list)
        for g, v in right.items():
            if category[g]:
                cats[category[g]].append(v)
        mean = lambda v: sum(v) / len(v) if v else 0.0  # noqa: E731
        return {"overall": {"acc": mean(list(right.values())), "vanilla_acc": mean(vanilla)},
                "per_category": {c: {"acc": mean(v)} for c, v in sorted(cats.items())},
                "count": len(right), "rotations_scored": sum(len(v) for v in groups.values())}


@register
class MMBenchEN(MMBench):
    name = "mmbench-en"
    files = "VLMEvalKit MMBench_DEV_EN(_V11).tsv"


@register
class MMBenchCN(MMBench):
    name = "mmbench-cn"
    files = "VLMEvalKit MMBench_DEV_CN(_V11).tsv"


@register
class SEEDBench(MultipleChoice):
    name = "seed-bench"
    files = "VLMEvalKit SEEDBench_IMG.tsv"


@register
class AI2D(MultipleChoice):
    name = "ai2d"
    files = "VLMEvalKit AI2D_TEST.tsv"


@register
class RealWorldQA(MultipleChoice):
    name = "realworldqa"
    files = "VLMEvalKit RealWorldQA.tsv"


@register
class MMMU(MultipleChoice):
    """MMMU: multiple choice where the row has options, open answers (string or number) otherwise."""

    name = "mmmu"
    files = "VLMEvalKit MMMU_DEV_VAL.tsv (image: base64 or a list of them)"

    def item(self, r, i, data, images):
        if options_of(r):
            it = super().item(r, i, data, images)
            it.meta["open"] = False
            return it
        return Item(_int(r["index"]), mcq_prompt(r["question"], {}, None if is_missing(r.get("hint")) else r["hint"]),
                    str(r["answer"]), images, str(r.get("category") or ""), {"open": True})

    def score_item(self, item, prediction):
        if not item.meta["open"]:
            return super().score_item(item, prediction)
        gold, pred = normalize_answer(item.answer), normalize_answer(prediction)
        num_gold, num_pred = _float(item.answer), last_number(prediction)
        if num_gold is not None and num_pred is not None:  # MMMU compares numbers rounded to 2 decimals
            return {"acc": float(round(num_gold, 2) == round(num_pred, 2))}
        return {"acc": float(bool(gold) and gold in pred)}


def _float(text) -> float | None:
    try:
        v = float(str(text).replace(",", ""))
        return v if math.isfinite(v) else None
    except ValueError:
        return None


@register
class MathVista(Benchmark):
    """MathVista (testmini): the question as written (it carries its own hint and choices); rule-based
    extraction in place of the reference's GPT extraction: the choice by letter or text, else the last number."""

    name = "mathvista"
    files = "VLMEvalKit MathVista_MINI.tsv (question_type, answer_type, precision, choices)"
    metrics = ("acc",)
    max_new_tokens = 64

    def read(self, data, images=None):
        rows = read_tsv(data, ("index", "question", "answer", "question_type", "answer_type"))
        items = []
        for i, (r, srcs) in enumerate(zip(rows, row_images(rows, data, images))):
            meta = {"type": r["question_type"], "answer_type": r["answer_type"],
                    "precision": int(float(r["precision"])) if not is_missing(r.get("precision")) else None}
            if r["question_type"] == "multi_choice":
                if is_missing(r.get("choices")):
                    raise DataError(f"{where(data, i, 'choices')}: empty for a multi_choice question")
                choices = choices_list(r["choices"], where(data, i, "choices"))
                meta["options"] = dict(zip(LETTERS, choices))
                if str(r["answer"]) not in choices:
                    raise DataError(f"{where(data, i, 'answer')}: {r['answer']!r} is not one of the choices")
            elif r["answer_type"] in ("integer", "float") and _float(r["answer"]) is None:
                raise DataError(f"{where(data, i, 'answer')}: {r['answer']!r} is not a number ({r['answer_type']})")
            items.append(Item(_int(r["index"]), r["question"], str(r["answer"]), srcs,
                              str(r.get("task") or r.get("category") or ""), meta))
        return items

    def score_item(self, item, prediction):
        m = item.meta
        if self.judge is not None:  # the reference's step: a judge extracts the answer, rules compare it
            prediction = self.judge.extract(item.prompt, prediction)
        if m["type"] == "multi_choice":
            letter = extract_choice(prediction, m["options"])
            return {"acc": float(letter is not None and m["options"][letter] == item.answer)}
        if m["answer_type"] in ("integer", "float"):
            got = last_number(prediction)
            if got is None:
                return {"acc": 0.0}
            digits = 0 if m["answer_type"] == "integer" else (m["precision"] if m["precision"] is not None else 2)
            return {"acc": float(round(got, digits) == round(_float(item.answer), digits))}
        return {"acc": float(str(prediction).strip().lower() == item.answer.strip().lower())}
