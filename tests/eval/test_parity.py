"""Scorers against the reference implementations lmms-eval ships (installed with the [eval] extra)."""

import random

import pytest

pytest.importorskip("lmms_eval")

from kelix.eval.answers import normalize_answer, ocrbench_match, relaxed_accuracy, vqa_accuracy  # noqa: E402

WORDS = ["Two", "two", "2", "the", "a", "an", "dog's", "dogs", "isnt", "isn't", "1,000", "3.5", "3.", "yes!",
         "x-ray", "(b)", "none", "Ten", "won't", "wont", "hello?", "a/b", "50%", "$5", "e.g.", "U.S.", "red,",
         "'quoted'", "ten.", "\tTab", "new\nline", "well", "were", "we'll", "hed", "shed", "im", "Im", "lets",
         "somebody'd", "youll", "." * 40, "a.b.c.d", "e.g"]


def _strings(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(n)]


def test_normalisation_matches_evalai_answer_processor():
    from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor

    ref = EvalAIAnswerProcessor()
    for s in [*WORDS, *_strings(400)]:
        assert normalize_answer(s) == ref(s), s


def test_vqa_accuracy_matches_lmms_eval_textvqa():
    from lmms_eval.tasks.textvqa.utils import textvqa_process_results

    rng = random.Random(1)
    pool = ["2", "two", "Two", "the bus", "bus", "red", "Red.", "route 2", "none", "0"]
    for _ in range(300):
        answers = [rng.choice(pool) for _ in range(10)]
        pred = rng.choice(pool)
        want = textvqa_process_results({"answers": list(answers), "question_id": 0}, [pred])["exact_match"]
        assert vqa_accuracy(pred, answers) == pytest.approx(want), (pred, answers)


def test_relaxed_accuracy_matches_lmms_eval_chartqa():
    from lmms_eval.tasks.chartqa.utils import relaxed_correctness

    rng = random.Random(2)
    targets = ["100", "0", "5%", "0.05", "Blue", "Blue ", "2019", "-3.2", "12.5", "5%%", " 7"]
    for _ in range(400):
        t = rng.choice(targets)
        p = rng.choice([*targets, str(round(rng.uniform(-5, 120), 2)), "blue", "blue ", "4.9%", "5.1%", "104.9",
                        "105.1", "5% ", " 100"])
        assert relaxed_accuracy(p, t) == float(relaxed_correctness(p, t)), (p, t)


def test_ocrbench_matches_lmms_eval():
    from lmms_eval.tasks.ocrbench.utils import ocrbench_process_results

    from kelix.eval.answers import HME

    cases = [("It says STOP", ["stop"], "IIIT5K"), ("x ^ { 2 }", ["x^{2}"], "HME100k"), ("X^{2}", ["x^{2}"], "HME100k"),
             ("go", ["stop", "halt"], "IIIT5K"), ("the total is $5", ["$5"], "FUNSD"), ("abc", "ABC", "IIIT5K")]
    for pred, answers, dataset in cases:
        want = ocrbench_process_results({"answer": answers, "dataset": dataset, "question_type": "t"}, [pred])
        category = HME if dataset == "HME100k" else "Regular Text Recognition"
        gold = [answers] if isinstance(answers, str) else answers
        assert ocrbench_match(pred, gold, category) == want["ocrbench_accuracy"]["score"], (pred, answers)
