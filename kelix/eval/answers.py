"""Answer extraction and scoring rules shared by the benchmarks (plain functions; see docs/eval.md).

* multiple choice (VLMEvalKit's rule-based matching): an option letter standing alone in the answer
  ("B", "(B)", "B.", "The answer is B"), else the one option whose text the answer contains;
* VQA accuracy (TextVQA / VQAv2 evaluation): answers normalised (case, punctuation, articles, number
  words, contractions), ``min(1, matches / 3)`` averaged over the 10 leave-one-out subsets of annotators;
* relaxed accuracy (ChartQA): numbers within 5% relative error, other answers equal after lowering;
* OCRBench: a gold answer contained in the prediction, case-insensitive (spaces removed and case kept
  for handwritten mathematical expressions).
"""

from __future__ import annotations

import re
import string

LETTERS = string.ascii_uppercase


# ---------------------------------------------------------------- multiple choice
def mcq_prompt(question: str, options: dict[str, str], hint: str | None = None) -> str:
    """The multiple-choice prompt as VLMEvalKit lays it out: hint, question, lettered options, instruction."""
    text = f"Hint: {hint}\n" if hint else ""
    text += f"Question: {question}\n"
    if options:
        text += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items())
        text += "Please select the correct answer from the options above. \n"
    return text


def _letter(prediction: str, letters: list[str]) -> str | None:
    # punctuation around a letter ("(B)", "B.", "**B**") becomes a word break
    words = re.sub(r"[.()\[\],:;!*#{}]", " ", prediction).split()
    found = [c for c in letters if c in words]
    return found[0] if len(found) == 1 else None


def _option_text(prediction: str, options: dict[str, str]) -> str | None:
    low = prediction.lower()
    found = [k for k, v in options.items() if str(v).lower() in low]
    return found[0] if len(found) == 1 else None


def extract_choice(prediction: str, options: dict[str, str]) -> str | None:
    """The option letter ``prediction`` picks, or None when it names none or several."""
    prediction = str(prediction)
    return _letter(prediction, list(options)) or _option_text(prediction, options)


# ---------------------------------------------------------------- VQA accuracy
_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())} | {"none": "0"}
_ARTICLES = {"a", "an", "the"}
# the written-without-apostrophe forms the VQA evaluation restores
_CONTRACTIONS = {w.replace("'", ""): w for w in (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's i'd i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't "
    "mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd she'd've "
    "she'll she's should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's "
    "someone'd someone'd've someone'll someone's something'd something'd've something'll that's there'd "
    "there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd we'd've we'll "
    "we're we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've "
    "who'll who're who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll "
    "y'all'd've you'd you'd've you'll you're you've").split()}
_PUNCT = list(";/[]\"{}()=+\\_-><@`,?!")  # the evaluation's list; '.' is handled apart, apostrophes stay
_PERIOD = re.compile(r"\.(?!\d)")  # what the reference's period rule does in effect: keep decimal points
_COMMA_NUMBER = re.compile(r"(\d),(\d)")


def normalize_answer(text: str) -> str:
    """The VQA evaluation's normalisation (TextVQA's EvalAI answer processor): lower case, commas and question
    marks dropped, punctuation, number words, articles, contractions."""
    text = str(text).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # punctuation next to a space (or a digit group comma) is dropped, elsewhere it separates words
    keep_join = _COMMA_NUMBER.search(text) is not None
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or keep_join:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out)
    words = []
    for w in out.split():
        w = _NUMBERS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Standard VQA accuracy against the annotators' ``answers`` (10 for TextVQA), leave-one-out averaged."""
    pred = normalize_answer(prediction)
    gold = [normalize_answer(a) for a in answers]
    accs = []
    for i in range(len(gold)):
        others = gold[:i] + gold[i + 1:]
        accs.append(min(1.0, sum(g == pred for g in others) / 3))
    return sum(accs) / len(accs) if accs else 0.0


# ---------------------------------------------------------------- ChartQA relaxed accuracy
def _number(text: str) -> float | None:
    text = text.strip()
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, target: str, tolerance: float = 0.05) -> float:
    """1 if ``prediction`` is within ``tolerance`` relative error of a numeric ``target``, or equal ignoring case."""
    prediction, target = str(prediction).strip(), str(target).strip()
    p, t = _number(prediction), _number(target)
    if p is not None and t:  # a zero target falls back to exact comparison, as the reference does
        return float(abs(p - t) / abs(t) <= tolerance)
    return float(prediction.lower() == target.lower())


# ---------------------------------------------------------------- OCRBench
HME = "Handwritten Mathematical Expression Recognition"


def ocrbench_match(prediction: str, answers: list[str], category: str) -> float:
    """1 if any gold answer is a substring of the prediction (OCRBench's rule)."""
    if category == HME:  # formulas: case matters, spaces do not
        pred = str(prediction).strip().replace("\n", " ").replace(" ", "")
        return float(any(a.strip().replace("\n", " ").replace(" ", "") in pred for a in answers))
    pred = str(prediction).lower().strip().replace("\n", " ")
    return float(any(a.lower().strip().replace("\n", " ") in pred for a in answers))


# ---------------------------------------------------------------- numbers in free text
def last_number(text: str) -> float | None:
    """The last number written in ``text`` ("... so the answer is 1,250.5" -> 1250.5)."""
    found = re.findall(r"-?\d[\d,]*\.?\d*|-?\.\d+", str(text))
    for s in reversed(found):
        try:
            return float(s.replace(",", "").rstrip("."))
        except ValueError:
            continue
    return None
