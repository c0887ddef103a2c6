"""Answer extraction and scoring rules. Every expected value is worked out by hand from the reference's code
(VLMEvalKit ``vlmeval/utils/matching_util.py`` at e8e78f0, lmms-eval 0.7.3's EvalAI processor and ChartQA
``relaxed_correctness``), the step that decides it named in the comment."""

import pytest

from kelix.eval.answers import (
    extract_choice,
    mcq_prompt,
    normalize_answer,
    ocrbench_match,
    relaxed_accuracy,
    vqa_accuracy,
)

# option texts total 5 + 5 + 10 + 7 = 27 characters: the text rule reads answers up to 54 characters
OPTIONS = {"A": "a cat", "B": "a dog", "C": "a red bird", "D": "nothing"}


@pytest.mark.parametrize("prediction, letter", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("**C**", "C"), ("The answer is D.", "D"),
    # C is word 6 of 11, not among the last 4: the letter rule passes, "answer is C" decides
    ("I think the answer is C, because the bird is red.", "C"),
    ("a dog", "B"),  # the option's text
    ("It shows a red bird on a branch", "C"),
    ("B or C", None),  # two letters, no "answer is", no option text
    ("a cat and a dog", None),  # two option texts
    ("no idea", None),
    # the lone letter is word 1 of 5, so not among the last 4; no option text inside
    ("B because it is bigger", None),
    # three letters stand alone, then the case-insensitive "answer is X" decides
    ("Between A and C, the answer is B", "B"),
    # "answer is a": the pattern ignores case, so the article reads as A
    ("The answer is a green square.", "A"),
    # ...and "answer is bigger" as B (the pattern needs no word break)
    ("The answer is bigger", "B"),
    # refusals and a lone Z give Z, with no fallback to the option text that follows
    ("Cannot determine the answer, but it is a dog", "Z"),
    ("I'm sorry, but without the image provided I guess a dog", "Z"),
    ("Z", "Z"), ("I pick Z.", "Z"),
    ("Z or B", "B"),  # a letter stands alone: Z counts only when none does
    # an API failure skips the letter rules (not the text rule)
    ("Failed to obtain answer via API: B a dog", "B"),
    ("Nothing.", "D"),  # option text matched on the lower-cased answer
    # 55 characters: past twice the options' length, so the text rule reads nothing
    ("It is clearly a dog, sitting there quietly on the grass.", None),
])
def test_extract_choice(prediction, letter):
    assert extract_choice(prediction, OPTIONS) == letter


def test_extract_choice_length_and_letter_limits():
    yes_no = {"A": "Yes", "B": "No"}  # 5 characters: answers up to 10 read by text
    assert extract_choice("Yes.", yes_no) == "A"
    assert extract_choice("Yes, it is.", yes_no) is None  # 11 characters
    five = {**OPTIONS, "E": "a fish"}
    assert extract_choice("Between A and B, the answer is E", five) is None  # the pattern knows A-D only
    assert extract_choice("answer: E", five) == "E"  # a lone letter among the last 4 words
    assert extract_choice(3, {"A": "3", "B": "4"}) == "A"  # not text: read as str


def test_mcq_prompt_layout():
    assert mcq_prompt("What is it?", {"A": "x", "B": "y"}, "Look closely.") == (
        "Hint: Look closely.\nQuestion: What is it?\nOptions:\nA. x\nB. y\n"
        "Please select the correct answer from the options above. \n")
    assert mcq_prompt("Open?", {}) == "Question: Open?\n"


@pytest.mark.parametrize("text, norm", [
    ("Two", "2"), ("two dogs", "2 dogs"), ("The Red Car.", "red car"), ("isnt", "isn't"),
    ("3.5", "3.5"), ("1,000", "1000"), ("yes!", "yes"), ("x-ray", "x ray"), ("none", "0"),
    # the contraction table is EvalAI's own: these plain words are not in it
    ("well", "well"), ("were", "were"), ("shed", "shed"), ("id", "id"), ("im", "im"), ("lets", "lets"),
    ("hed", "he'd"), ("youll", "you'll"),  # these are
    ("somebody'd", "somebodyd"),  # the table maps this one backwards
    ("." * 40, "." * 8), ("e.g.", "eg"),  # at most 32 periods go (re.sub's count is re.UNICODE = 32)
])
def test_normalize_answer(text, norm):
    assert normalize_answer(text) == norm


def test_vqa_accuracy_leave_one_out_by_hand():
    assert vqa_accuracy("Two", ["2"] * 10) == 1.0  # "Two" vs "2"
    assert vqa_accuracy("red", ["red"] * 4 + ["blue"] * 6) == 1.0
    # 2 of 10 say red: leaving a red out leaves 1 match (1/3), leaving a blue out leaves 2 (2/3)
    assert vqa_accuracy("red", ["red"] * 2 + ["blue"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert vqa_accuracy("red", ["red"] + ["blue"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    assert vqa_accuracy("green", ["red"] * 10) == 0.0
    assert vqa_accuracy("well", ["we'll"] * 10) == 0.0  # "well" stays a word, "we'll" stays a contraction


@pytest.mark.parametrize("pred, target, score", [
    ("104.9", "100", 1.0), ("105.1", "100", 0.0),  # 4.9% vs 5.1% relative error
    ("95.1", "100", 1.0), ("94.9", "100", 0.0),
    ("52%", "0.5", 1.0), ("Yes", "yes", 1.0), ("No", "yes", 0.0), ("0", "0", 1.0), ("0.01", "0", 0.0),
    ("Blue", "Blue ", 0.0), ("Blue ", "Blue", 0.0),  # nothing is stripped: "blue" != "blue "
    ("5%%", "0.05", 1.0),  # every trailing % goes: float("5") / 100
    (" 100", "100", 1.0),  # float() itself skips spaces
    ("5% ", "0.05", 0.0),  # does not end with %: float("5% ") fails, and the texts differ
])
def test_relaxed_accuracy(pred, target, score):
    assert relaxed_accuracy(pred, target) == score


def test_ocrbench_match():
    assert ocrbench_match("The sign says STOP here", ["stop"], "Regular Text Recognition") == 1.0
    assert ocrbench_match("go", ["stop", "halt"], "Regular Text Recognition") == 0.0
    hme = "Handwritten Mathematical Expression Recognition"
    assert ocrbench_match("x ^ { 2 } + y", ["x^{2}+y"], hme) == 1.0  # spaces removed
    assert ocrbench_match("X^{2}+y", ["x^{2}+y"], hme) == 0.0  # case kept for formulas


def test_relaxed_accuracy_includes_the_5_percent_bound():
    # ChartQA's rule is relative error <= 5%: exactly 5% off is right, just over is wrong
    assert relaxed_accuracy("105", "100") == relaxed_accuracy("95", "100") == 1.0
    assert relaxed_accuracy("105.1", "100") == relaxed_accuracy("94.9", "100") == 0.0
