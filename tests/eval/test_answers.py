"""Answer extraction and scoring rules against hand-computed values and the reference scripts' edge cases."""

import pytest

from kelix.eval.answers import (
    extract_choice,
    last_number,
    mcq_prompt,
    normalize_answer,
    ocrbench_match,
    relaxed_accuracy,
    vqa_accuracy,
)

OPTIONS = {"A": "a cat", "B": "a dog", "C": "a red bird", "D": "nothing"}


@pytest.mark.parametrize("prediction, letter", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("**C**", "C"), ("The answer is D.", "D"),
    ("I think the answer is C, because the bird is red.", "C"),  # a letter inside free text
    ("a dog", "B"),  # the option's text
    ("It shows a red bird on a branch", "C"),
    ("B or C", None),  # two letters: undecided
    ("a cat and a dog", None),  # two option texts
    ("no idea", None),
])
def test_extract_choice(prediction, letter):
    assert extract_choice(prediction, OPTIONS) == letter


def test_mcq_prompt_layout():
    assert mcq_prompt("What is it?", {"A": "x", "B": "y"}, "Look closely.") == (
        "Hint: Look closely.\nQuestion: What is it?\nOptions:\nA. x\nB. y\n"
        "Please select the correct answer from the options above. \n")
    assert mcq_prompt("Open?", {}) == "Question: Open?\n"


@pytest.mark.parametrize("text, norm", [
    ("Two", "2"), ("two dogs", "2 dogs"), ("The Red Car.", "red car"), ("isnt", "isn't"),
    ("3.5", "3.5"), ("1,000", "1000"), ("yes!", "yes"), ("x-ray", "x ray"), ("none", "0"),
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


@pytest.mark.parametrize("pred, target, score", [
    ("104.9", "100", 1.0), ("105.1", "100", 0.0),  # 4.9% vs 5.1% relative error
    ("95.1", "100", 1.0), ("94.9", "100", 0.0),
    ("52%", "0.5", 1.0), ("Yes", "yes", 1.0), ("No", "yes", 0.0), ("0", "0", 1.0), ("0.01", "0", 0.0),
])
def test_relaxed_accuracy(pred, target, score):
    assert relaxed_accuracy(pred, target) == score


def test_ocrbench_match():
    assert ocrbench_match("The sign says STOP here", ["stop"], "Regular Text Recognition") == 1.0
    assert ocrbench_match("go", ["stop", "halt"], "Regular Text Recognition") == 0.0
    hme = "Handwritten Mathematical Expression Recognition"
    assert ocrbench_match("x ^ { 2 } + y", ["x^{2}+y"], hme) == 1.0  # spaces removed
    assert ocrbench_match("X^{2}+y", ["x^{2}+y"], hme) == 0.0  # case kept for formulas


def test_last_number():
    assert last_number("first 3, so the answer is 1,250.5.") == 1250.5
    assert last_number("none here") is None


def test_relaxed_accuracy_includes_the_5_percent_bound():
    # ChartQA's rule is relative error <= 5%: exactly 5% off is right, just over is wrong
    assert relaxed_accuracy("105", "100") == relaxed_accuracy("95", "100") == 1.0
    assert relaxed_accuracy("105.1", "100") == relaxed_accuracy("94.9", "100") == 0.0
