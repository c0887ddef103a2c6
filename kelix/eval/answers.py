"""Answer extraction and scoring rules, as the reference toolkits apply them (plain functions; docs/eval.md).

* multiple choice: VLMEvalKit's ``can_infer`` (``vlmeval/utils/matching_util.py`` at the commit in
  :data:`VLMEVALKIT_COMMIT`): a lone option letter among the last 4 words, a refusal or a lone "Z" (= no
  option), an ``answer is X`` phrase (X in A-D, any case), else the one option text inside a short answer;
* VQA accuracy (TextVQA): the EvalAI answer processor as lmms-eval 0.7.3 implements it, ``min(1, matches / 3)``
  averaged over the 10 leave-one-out subsets of annotators;
* relaxed accuracy (ChartQA, lmms-eval 0.7.3): numbers within 5% relative error, else equal after lowering;
* OCRBench (VLMEvalKit): a gold answer contained in the prediction, case-insensitive (spaces removed and case
  kept for handwritten mathematical expressions).
"""

from __future__ import annotations

import re
import string

LETTERS = string.ascii_uppercase
VLMEVALKIT_COMMIT = "e8e78f05f3080fe28154f2130321f17951c3be94"  # 2026-08-18, the reference read for every rule
LMMS_EVAL_VERSION = "0.7.3"


# ---------------------------------------------------------------- multiple choice
def mcq_prompt(question: str, options: dict[str, str], hint: str | None = None) -> str:
    """The multiple-choice prompt as VLMEvalKit lays it out: hint, question, lettered options, instruction."""
    text = f"Hint: {hint}\n" if hint is not None else ""
    text += f"Question: {question}\n"
    if options:
        text += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items())
        text += "Please select the correct answer from the options above. \n"
    return text


API_FAILURE = "Failed to obtain answer via API"
# answers VLMEvalKit reads as "no option" (Z) outright
REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer")
_ANSWER_IS = re.compile(r"(?:correct\s+)?answer\s+is\s+\**([abcd])\**", re.IGNORECASE)


def _by_letter(prediction: str, letters: list[str]) -> str | None:
    if API_FAILURE in prediction:
        return None  # left to the text rule
    if any(r in prediction for r in REFUSALS):
        return "Z"
    words = re.sub(r"[.()\[\],:;!*#{}]", " ", prediction).split()
    named = [c for c in letters if c in words]
    if len(named) == 1:
        # a letter counts only where it first stands among the last four words ("B because..." does not)
        if words.index(named[0]) >= len(words) - 4:
            return named[0]
    elif not named and "Z" in words:
        return "Z"
    m = _ANSWER_IS.search(prediction)  # "Between A and C, the answer is B"; "the answer is a cat" reads as A
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    return None


def _by_text(prediction: str, options: dict[str, str]) -> str | None:
    low = prediction.lower()
    if len(low) > 2 * sum(len(str(v)) for v in options.values()):
        return None  # a long answer mentions options in passing
    found = [k for k, v in options.items() if str(v).lower() in low]
    return found[0] if len(found) == 1 else None


def extract_choice(prediction, options: dict[str, str]) -> str | None:
    """The option letter ``prediction`` picks, ``"Z"`` for an explicit non-answer, or None (VLMEvalKit's
    ``can_infer``: letter rules first, then option text; "Z" never falls back to the text)."""
    prediction = str(prediction)
    return _by_letter(prediction, list(options)) or _by_text(prediction, options)


# ---------------------------------------------------------------- VQA accuracy (EvalAI answer processor)
_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())} | {"none": "0"}
_ARTICLES = {"a", "an", "the"}
# EvalAI's contraction table: written-without-apostrophes keys (its own list, not every stripped contraction:
# "well", "were", "shed", "id", "im", "lets" stay plain words; "Im"/"Ive" keep a capital, so never match)...
_CONTRACTIONS = {w.replace("'", ""): w for w in (
    "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd how'll how's "
    "I'm I've isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've o'clock oughtn't shan't "
    "should've shouldn't somebody'll somebody's someone'd someone'll someone's something'd something'll that's "
    "there'd there're there's they'd they'll they're they've 'twas wasn't we've weren't what'll what're what's "
    "what've when's where'd where's where've who'd who'll who's who've why'll why're why's won't would've "
    "wouldn't y'all you'd you'll you're you've").split()}
# ...and its half-apostrophe keys, one "key:value" each (including its "somebody'd" -> "somebodyd")
_CONTRACTIONS |= dict(kv.split(":") for kv in (
    "couldn'tve:couldn't've couldnt've:couldn't've hadnt've:hadn't've hadn'tve:hadn't've hed've:he'd've "
    "he'dve:he'd've Id've:I'd've I'dve:I'd've itd've:it'd've it'dve:it'd've let's:let's mightnt've:mightn't've "
    "mightn'tve:mightn't've ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at shed've:she'd've she'dve:she'd've "
    "she's:she's shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd "
    "somebodyd've:somebody'd've somebody'dve:somebody'd've someoned've:someone'd've someone'dve:someone'd've "
    "somethingd've:something'd've something'dve:something'd've thered've:there'd've there'dve:there'd've "
    "theyd've:they'd've they'dve:they'd've wed've:we'd've we'dve:we'd've whod've:who'd've who'dve:who'd've "
    "wouldnt've:wouldn't've wouldn'tve:wouldn't've yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've "
    "y'alld've:y'all'd've y'all'dve:y'all'd've youd've:you'd've you'dve:you'd've").split())
_PUNCT = list(";/[]\"{}()=+\\_-><@`,?!")  # the processor's list; '.' is handled apart, apostrophes stay
_PERIOD = re.compile(r"\.(?!\d)")
# the processor passes re.UNICODE (32) where re.sub takes its count: at most 32 periods go
_PERIOD_COUNT = int(re.UNICODE)


def normalize_answer(text: str) -> str:
    """The EvalAI answer processor (lmms-eval 0.7.3): lower case, commas and question marks dropped,
    punctuation, at most 32 periods not before a digit, number words, articles, contractions."""
    text = str(text).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text  # commas are gone, so the processor's digit-comma rule never fires
    for p in _PUNCT:  # punctuation next to a space is dropped, elsewhere it separates words
        out = out.replace(p, "" if (p + " " in text or " " + p in text) else " ")
    out = _PERIOD.sub("", out, count=_PERIOD_COUNT)
    words = [_NUMBERS.get(w, w) for w in out.split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


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
    try:  # every trailing "%" goes; nothing is stripped around the text (float() itself allows spaces)
        return float(text.rstrip("%")) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, target: str, tolerance: float = 0.05) -> float:
    """1 if ``prediction`` is within ``tolerance`` relative error of a numeric, non-zero ``target``, else 1 if
    the two are equal ignoring case (lmms-eval's ``relaxed_correctness``: neither side is stripped)."""
    prediction, target = str(prediction), str(target)
    p, t = _number(prediction), _number(target)
    if p is not None and t:
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
