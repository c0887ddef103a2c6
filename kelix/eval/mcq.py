"""VLMEvalKit TSV benchmarks: MMBench EN/CN (circular), SEED-Bench, AI2D, RealWorldQA, MMMU, MathVista.

Each reproduces VLMEvalKit at :data:`kelix.eval.answers.VLMEVALKIT_COMMIT`: the prompt of its
``ImageMCQDataset.build_prompt`` (MMMU: images placed where ``<image k>`` stands), options read as pandas
reads the TSV, answers extracted by its ``can_infer`` (:func:`kelix.eval.answers.extract_choice`), MMBench
scored circularly (VLMEvalKit's files hold each question's rotations as ``index + k * 1_000_000``; a file
without them gets them built here), accuracies per ``split``, ``l2-category`` and ``category`` as its
``report_acc``. An item the rules cannot decide goes to the judge when one is given (``--judge-url``), as
VLMEvalKit's does, and is wrong otherwise; ``decided_by`` in scores.json counts each path.
"""

from __future__ import annotations

import ast
from collections import defaultdict

from kelix.eval.answers import LETTERS, extract_choice, mcq_prompt
from kelix.eval.base import Benchmark, DataError, Item, mean_scores, register, where
from kelix.eval.tsv import choices_list, is_missing, options_of, read_tsv, row_images

ROTATION = 1_000_000  # VLMEvalKit: index % 1e6 names the question a rotated copy belongs to
OPEN_OTHER = "Other Answers"  # VLMEvalKit's option B for an MMMU open question (A being the gold answer)


def _mean(v: list[float]) -> float:
    return sum(v) / len(v) if v else 0.0


def report(rows: list[tuple[dict, float]]) -> dict:
    """VLMEvalKit's ``report_acc``: mean hit overall, per ``split`` (when the file has one), per
    ``l2-category`` and per ``category`` (``rows``: (the item's meta, hit))."""
    out = {"acc": _mean([h for _, h in rows])}
    groups = {}
    for key, name in (("split", "per_split"), ("l2", "per_l2_category")):
        vals = defaultdict(list)
        for m, h in rows:
            if m.get(key) is not None:
                vals[str(m[key])].append(h)
        if vals:
            groups[name] = {k: {"acc": _mean(v)} for k, v in sorted(vals.items())}
    return {"overall": out, **groups}


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
            raise DataError(f"{where(data, i, 'A')}: a multiple-choice row needs at least two options")
        answer = str(r["answer"])
        if answer not in options:
            raise DataError(f"{where(data, i, 'answer')}: {answer!r} is not one of the options {''.join(options)}")
        hint = None if is_missing(r.get("hint")) else str(r["hint"])
        return Item(_int(r["index"]), mcq_prompt(str(r["question"]), options, hint), answer, images,
                    _text(r.get("category")), {"options": options, "question": str(r["question"]), "hint": hint,
                                               "row": _row(r), **_groups(r)})

    def choose(self, item: Item, prediction: str) -> tuple[str | None, str]:
        """``(letter, path)``: the rules' letter ("Z" included), else the judge's, else None."""
        letter = extract_choice(prediction, item.meta["options"])
        if letter:
            return letter, "rule"
        if self.judge is not None:  # VLMEvalKit asks its judge only when the rules fail
            return self.judge.choose(item.meta["question"], item.meta["options"], prediction), "judge"
        return None, "none"

    def score_item(self, item: Item, prediction: str) -> dict:
        letter, path = self.choose(item, prediction)
        return {"acc": float(letter == item.answer), "path": path}

    def aggregate(self, items, scores, predictions):
        out = mean_scores(items, scores)
        out.update(report([(it.meta, scores[it.key]["acc"]) for it in items if it.key in scores]))
        return out


def _text(v) -> str:
    return "" if is_missing(v) else str(v)


def _row(r: dict) -> dict:
    """The row as a prediction file carries it (VLMEvalKit drops ``image``; kept here without it, to spare memory)."""
    return {k: v for k, v in r.items() if k != "image"}


def _groups(r: dict) -> dict:
    return {"split": None if is_missing(r.get("split")) else r["split"],
            "l2": None if is_missing(r.get("l2-category")) else r["l2-category"]}


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
        answer = letters[(letters.index(item.answer) - k) % len(letters)]
        row = {**item.meta["row"], **new, "answer": answer}
        out.append(Item(item.id + k * ROTATION, mcq_prompt(item.meta["question"], new, item.meta["hint"]), answer,
                        item.images, item.category, {**item.meta, "options": new, "row": row}))
    return out


class MMBench(MultipleChoice):
    """MMBench with VLMEvalKit's circular evaluation (``mcq_circular_eval``)."""

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
        keep = set(list(dict.fromkeys(it.id % ROTATION for it in items))[:n])
        return [it for it in items if it.id % ROTATION in keep]

    def aggregate(self, items, scores, predictions):
        groups: dict[int, list[tuple[float, str]]] = defaultdict(list)
        main = {}
        for it in items:
            if it.key in scores:
                groups[it.id % ROTATION].append((scores[it.key]["acc"], scores[it.key]["path"]))
                if it.id < ROTATION:
                    main[it.id] = it
        # a question counts when its original row was answered (VLMEvalKit's data_main), right only when all
        # its answered rotations are; a rotation the rules read wrongly decides the group by rule alone
        rows, paths, vanilla = [], defaultdict(int), []
        for g, it in main.items():
            vals = groups[g]
            hit = float(all(h == 1.0 for h, _ in vals))
            ruled = any(p == "rule" and h == 0.0 for h, p in vals) or all(p == "rule" for _, p in vals)
            paths["rule" if ruled else "judge" if any(p == "judge" for _, p in vals) else "none"] += 1
            rows.append((it.meta, hit))
            vanilla.append(scores[it.key]["acc"])
        out = report(rows)
        cats = defaultdict(list)
        for (_, h), it in zip(rows, main.values()):
            if it.category:
                cats[it.category].append(h)
        out["overall"]["vanilla_acc"] = _mean(vanilla)
        return {**out, "per_category": {c: {"acc": _mean(v)} for c, v in sorted(cats.items())}, "count": len(rows),
                "rotations_scored": sum(len(groups[g]) for g in main), "decided_by": dict(sorted(paths.items()))}


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


def interleave(text: str, images: list, at: str) -> tuple[list, list[str]]:
    """VLMEvalKit's ``split_MMMU``: ``(images in reading order, texts around them)`` of a prompt whose
    ``<image k>`` marks stand for the row's k-th image (1-based; a mark may repeat an image)."""
    parts = text.split("<image ")
    if len(parts) == 1:
        return images, ["", text]  # no mark: images first, then the text
    texts, placed = [parts[0]], []
    for seg in parts[1:]:
        if len(seg) < 2 or not seg[0].isdigit() or seg[1] != ">" or not 1 <= int(seg[0]) <= len(images):
            raise DataError(f"{at}: '<image {seg[:2]}' is not a mark of one of the row's {len(images)} image(s)")
        placed.append(images[int(seg[0]) - 1])
        texts.append(seg[2:])
    return placed, texts


@register
class MMMU(MultipleChoice):
    """MMMU: choice questions as every MCQ; an open question (no option A) is asked without options and
    scored as VLMEvalKit's ``MMMU_preproc`` makes it: options A = the gold answer, B = "Other Answers", gold A
    (or the answer itself when it is a single capital letter)."""

    name = "mmmu"
    files = "VLMEvalKit MMMU_DEV_VAL.tsv (image: base64 or a list of them)"

    def item(self, r, i, data, images):
        hint = None if is_missing(r.get("hint")) else str(r["hint"])
        options = options_of(r)
        if is_missing(r.get("A")):  # VLMEvalKit looks at A alone
            prompt = mcq_prompt(str(r["question"]), options, hint)
            options = {**options, "A": str(r["answer"]), "B": OPEN_OTHER}
            # VLMEvalKit's gold: the answer when it is one capital letter (then "Other Answers" may be right), else A
            gold = str(r["answer"]) if str(r["answer"]) in LETTERS and len(str(r["answer"])) == 1 else "A"
            it = Item(_int(r["index"]), prompt, gold, images, _text(r.get("category")),
                      {"options": dict(sorted(options.items())), "question": str(r["question"]), "hint": hint,
                       "open": True, "gold": str(r["answer"]), "row": _row(r), **_groups(r)})
        else:
            it = super().item(r, i, data, images)
            it.meta["open"] = False
        it.images, it.meta["segments"] = interleave(it.prompt, images, where(data, i, "question"))
        return it


@register
class MathVista(Benchmark):
    """MathVista (testmini), as VLMEvalKit scores it: the rules (its prefetch) take a choice the answer names
    (``can_infer``) or an answer that is entirely the gold integer / float; the judge (``--judge-url``) extracts
    an answer from every other response, which is then compared the same way; without a judge those are
    counted wrong (``decided_by.none``), so the score is a lower bound of the judged one."""

    name = "mathvista"
    files = "VLMEvalKit MathVista_MINI.tsv (question_type, answer_type, choices, answer_option, task, skills)"
    metrics = ("acc",)
    max_new_tokens = 64

    def read(self, data, images=None):
        rows = read_tsv(data, ("index", "question", "answer", "question_type", "answer_type"))
        items = []
        for i, (r, srcs) in enumerate(zip(rows, row_images(rows, data, images))):
            meta = {"type": r["question_type"], "answer_type": r["answer_type"], "skills": _skills(r.get("skills")),
                    "raw_answer": r["answer"], "row": _row(r)}  # as pandas read it: int("14") and int(14.0) both hold
            if r["question_type"] == "multi_choice":
                if is_missing(r.get("choices")):
                    raise DataError(f"{where(data, i, 'choices')}: empty for a multi_choice question")
                choices = choices_list(r["choices"], where(data, i, "choices"))
                meta["options"] = dict(zip(LETTERS, choices))
                option = r.get("answer_option")
                if is_missing(option):  # files without the column: the letter of the answer's text
                    if str(r["answer"]) not in choices:
                        raise DataError(f"{where(data, i, 'answer')}: {str(r['answer'])!r} is not one of the choices")
                    option = LETTERS[choices.index(str(r["answer"]))]
                meta["option"] = str(option)
            items.append(Item(_int(r["index"]), str(r["question"]), str(r["answer"]), srcs,
                              _text(r.get("task")) or _text(r.get("category")), meta))
        return items

    @staticmethod
    def check(item: Item, response: str, prefetch: bool):
        """VLMEvalKit's ``post_check``: with ``prefetch`` the choice read or the equal number (what the rules
        decide; a falsy one, such as 0, decides nothing), else whether ``response`` is right."""
        m = item.meta
        if m["type"] == "multi_choice":
            letter = extract_choice(response, m["options"])
            return letter if prefetch else letter == m["option"]
        kind = {"integer": int, "float": float}.get(m["answer_type"])
        if kind is None:
            return False  # VLMEvalKit compares str(None) with the answer: text and list answers never match
        try:
            got, want = kind(response), kind(m["raw_answer"])
        except ValueError:
            return False
        if got != want:
            return False
        return got if prefetch else True

    def score_item(self, item, prediction):
        decided = self.check(item, str(prediction), prefetch=True)
        if decided:
            return {"acc": float(self.check(item, str(decided), prefetch=False)), "path": "rule"}
        if self.judge is not None:  # the judge extracts the answer from every response the rules left
            return {"acc": float(self.check(item, self.judge.extract(item.prompt, prediction), False)),
                    "path": "judge"}
        return {"acc": 0.0, "path": "none"}

    def aggregate(self, items, scores, predictions):
        out = mean_scores(items, scores)
        skills = defaultdict(list)
        for it in items:
            if it.key in scores:
                for s in it.meta["skills"]:
                    skills[s].append(scores[it.key]["acc"])
        out["per_skill"] = {s: {"acc": _mean(v)} for s, v in sorted(skills.items())}
        return out


def _skills(v) -> list[str]:
    if is_missing(v):
        return []
    try:
        out = ast.literal_eval(str(v))  # a list literal, never code
    except (ValueError, SyntaxError):
        return [str(v)]
    return [str(x) for x in out] if isinstance(out, (list, tuple)) else [str(out)]
