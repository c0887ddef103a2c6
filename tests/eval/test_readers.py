"""Readers of the published formats (fixtures written here in the official layouts) and their scorers."""

import base64
import csv
import io
import json

import pytest
from PIL import Image

from kelix.eval import get_benchmark
from kelix.eval.base import DataError


def b64png(color=(200, 30, 30), size=(20, 16)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path, rows):
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, cols, delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    return str(path)


MMB = [dict(index=0, image=b64png(), question="What animal is this?", hint="", A="cat", B="dog", C="bird", D="fish",
            answer="B", category="animal", **{"l2-category": "perception", "split": "dev"}),
       dict(index=1, image=b64png((0, 0, 200)), question="What colour?", hint="Look at the middle.", A="red", B="blue",
            C="", D="", answer="B", category="colour", **{"l2-category": "perception", "split": "dev"})]


def scores_of(bench, items, preds):
    scores = {it.key: bench.score_item(it, preds[it.key]) for it in items}
    return bench.aggregate(items, scores, preds)


def test_mmbench_builds_rotations_and_scores_circularly(tmp_path):
    bench = get_benchmark("mmbench-en")
    items = bench.read(write_tsv(tmp_path / "MMBench_DEV_EN.tsv", MMB))
    bench.check_images(items, "MMBench_DEV_EN.tsv")
    assert [it.id for it in items] == [0, 1_000_000, 2_000_000, 3_000_000, 1, 1_000_001]
    assert items[0].prompt == ("Question: What animal is this?\nOptions:\nA. cat\nB. dog\nC. bird\nD. fish\n"
                               "Please select the correct answer from the options above. \n")
    assert items[4].prompt.startswith("Hint: Look at the middle.\nQuestion: What colour?\nOptions:\nA. red\nB. blue\n")
    assert [it.answer for it in items] == ["B", "A", "D", "C", "B", "A"]  # "dog" moves as the options rotate
    assert items[1].meta["options"] == {"A": "dog", "B": "bird", "C": "fish", "D": "cat"}
    # consistent answers (by text, then by the rotated letter) score 1; a fixed letter is inconsistent
    right = {"0": "dog", "1000000": "A", "2000000": "(D)", "3000000": "The answer is C.", "1": "B. blue", "1000001": "A"}
    out = scores_of(bench, items, right)
    assert out["overall"] == {"acc": 1.0, "vanilla_acc": 1.0} and out["count"] == 2
    fixed = {**right, "1000000": "B", "2000000": "B", "3000000": "B"}
    out = scores_of(bench, items, fixed)
    assert out["overall"] == {"acc": 0.5, "vanilla_acc": 1.0}  # right on the original, wrong once rotated
    assert out["per_category"] == {"animal": {"acc": 0.0}, "colour": {"acc": 1.0}}
    assert [it.id for it in bench.limit(items, 1)] == [0, 1_000_000, 2_000_000, 3_000_000]  # --limit: whole questions


def test_mmbench_file_with_its_own_rotations_and_shared_images(tmp_path):
    rows = [MMB[1], {**MMB[1], "index": 1_000_001, "image": "1", "A": "blue", "B": "red", "answer": "A"}]
    items = get_benchmark("mmbench-cn").read(write_tsv(tmp_path / "MMBench_DEV_CN.tsv", rows))
    assert [it.id for it in items] == [1, 1_000_001]
    assert items[1].images == items[0].images  # the short image field names the row holding the image
    bad = [MMB[1], {**MMB[1], "index": 1_000_001, "image": "7"}]
    with pytest.raises(DataError, match=r"row 1 field 'image': refers to index '7', which holds no image"):
        get_benchmark("mmbench-cn").read(write_tsv(tmp_path / "bad.tsv", bad))


@pytest.mark.parametrize("name", ["seed-bench", "ai2d", "realworldqa"])
def test_plain_multiple_choice(tmp_path, name):
    bench = get_benchmark(name)
    items = bench.read(write_tsv(tmp_path / "x.tsv", MMB))
    assert len(items) == 2  # no rotations outside MMBench
    out = scores_of(bench, items, {"0": "I believe it is B, the dog", "1": "A"})
    assert out["overall"] == {"acc": 0.5} and out["per_category"] == {"animal": {"acc": 1.0}, "colour": {"acc": 0.0}}


def test_multiple_choice_bad_rows(tmp_path):
    bench = get_benchmark("ai2d")
    with pytest.raises(DataError, match=r"x.tsv row 1 field 'answer': 'E' is not one of the options AB"):
        bench.read(write_tsv(tmp_path / "x.tsv", [MMB[0], {**MMB[1], "answer": "E"}]))
    rows = [{k: v for k, v in r.items() if k != "question"} for r in MMB]
    with pytest.raises(DataError, match=r"y.tsv field 'question': missing column"):
        bench.read(write_tsv(tmp_path / "y.tsv", rows))
    items = bench.read(write_tsv(tmp_path / "z.tsv", [{**MMB[0], "image": base64.b64encode(b"x" * 90).decode()}]))
    with pytest.raises(DataError, match=r"z.tsv row 0 field 'image': image does not decode"):
        bench.check_images(items, str(tmp_path / "z.tsv"))


def test_mmmu_choice_and_open(tmp_path):
    rows = [dict(index=1, image=str([b64png(), b64png((0, 200, 0))]), question="<image 2> vs <image 1>: which is red?",
                 A="left", B="right", answer="A", category="Art", split="validation"),
            dict(index=2, image=b64png(), question="How many litres?", A="", B="", answer="2.50", category="Physics",
                 split="validation"),
            dict(index=3, image=b64png(), question="Which city?", A="", B="", answer="Paris", category="Geography",
                 split="dev")]
    bench = get_benchmark("mmmu")
    items = bench.read(write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", rows))
    # VLMEvalKit's split_MMMU: each image where its mark stands, in the marks' order
    assert items[0].meta["segments"] == ["Question: ", " vs ", ": which is red?\nOptions:\nA. left\nB. right\n"
                                         "Please select the correct answer from the options above. \n"]
    assert items[0].images[1] == items[1].images[0] != items[0].images[0]  # image 2 (green) is placed first
    # an open question is asked without options and scored as A = the gold text, B = "Other Answers"
    assert items[1].prompt == "Question: How many litres?\n" and items[1].meta["segments"] == ["", items[1].prompt]
    assert items[1].meta["options"] == {"A": "2.50", "B": "Other Answers"} and items[1].answer == "A"
    score = lambda it, p: bench.score_item(it, p)["acc"]  # noqa: E731
    assert score(items[0], "(A) left") == 1.0
    assert score(items[1], "2.50 litres") == 1.0
    assert score(items[1], "It holds 2.5 litres") == 0.0  # "2.50" is not inside it
    assert score(items[1], "2.4") == 0.0 and score(items[1], "2.500") == 1.0  # text containment, not numbers
    assert score(items[1], "Other Answers") == 0.0  # reads as B
    assert score(items[2], "the city of paris") == 1.0 and score(items[2], "London") == 0.0
    # an open answer that is one capital letter is VLMEvalKit's gold letter: "Other Answers" (B) is then right
    letter = bench.read(write_tsv(tmp_path / "l.tsv", [{**rows[2], "answer": "B"}]))[0]
    assert letter.meta["options"] == {"A": "B", "B": "Other Answers"} and score(letter, "Other Answers") == 1.0
    out = scores_of(bench, items, {"1": "B", "2": "2.50", "3": "Paris"})
    assert out["overall"]["acc"] == pytest.approx(2 / 3)
    assert out["per_split"] == {"dev": {"acc": 1.0}, "validation": {"acc": 0.5}}  # VLMEvalKit reports each split
    bad = [{**rows[0], "question": "<image 3> which?"}]
    with pytest.raises(DataError, match=r"row 0 field 'question': '<image 3>' is not a mark of one of the row's 2"):
        bench.read(write_tsv(tmp_path / "bad.tsv", bad))


def test_tsv_options_read_as_pandas_reads_them(tmp_path):
    # pandas' NA strings are missing options, and a gap keeps the letters after it (build_choices)
    rows = [{**MMB[0], "A": "yes", "B": "no", "C": "None", "D": "maybe", "answer": "D"},
            {**MMB[1], "A": "N/A", "B": "null", "C": "NA", "D": "nan", "E": "a", "F": "b", "answer": "F"}]
    items = get_benchmark("seed-bench").read(write_tsv(tmp_path / "s.tsv", rows))
    assert items[0].meta["options"] == {"A": "yes", "B": "no", "D": "maybe"}
    assert items[0].prompt.endswith("A. yes\nB. no\nD. maybe\nPlease select the correct answer from the options above. \n")
    assert items[1].meta["options"] == {"E": "a", "F": "b"}
    assert get_benchmark("seed-bench").score_item(items[0], "D")["acc"] == 1.0
    # a numeric option column with a gap reads as floats, and VLMEvalKit prints them so
    rows = [{**MMB[0], "A": "1", "B": "2", "C": "", "D": "", "answer": "B"}, {**MMB[1], "A": "3", "B": "4"}]
    items = get_benchmark("seed-bench").read(write_tsv(tmp_path / "n.tsv", rows))
    assert items[0].meta["options"] == {"A": "1", "B": "2"}  # an int column stays int
    rows[1]["C"] = "2.5"
    items = get_benchmark("seed-bench").read(write_tsv(tmp_path / "f.tsv", rows))
    assert items[1].meta["options"] == {"A": "3", "B": "4", "C": "2.5"} and items[0].meta["options"] == {"A": "1", "B": "2"}


def test_mathvista(tmp_path):
    common = dict(image=b64png(), task="figure QA", precision="", skills=str(["arithmetic reasoning"]))
    rows = [dict(index=1, question="Which is larger? Choices: (A) 3 (B) 5", answer="5", question_type="multi_choice",
                 answer_type="text", choices=str(["3", "5"]), **common),
            dict(index=2, question="How many?", answer="12", question_type="free_form", answer_type="integer",
                 choices="", **common),
            dict(index=3, question="Length?", answer="1.25", question_type="free_form", answer_type="float",
                 choices="", **{**common, "precision": "1"}),
            dict(index=4, question="How many left?", answer="0", question_type="free_form", answer_type="integer",
                 choices="", **common),
            dict(index=5, question="Name it", answer="cat", question_type="free_form", answer_type="text",
                 choices="", **common)]
    bench = get_benchmark("mathvista")
    items = bench.read(write_tsv(tmp_path / "MathVista_MINI.tsv", rows))
    assert items[0].meta["option"] == "B"  # no answer_option column: the letter of the answer's text
    s = lambda i, p: bench.score_item(items[i], p)  # noqa: E731
    # prefetch: a choice by can_infer, or a response that is wholly the number (int() / float(), exact)
    assert s(0, "The answer is B") == {"acc": 1.0, "path": "rule"}
    assert s(0, "3") == {"acc": 0.0, "path": "rule"}  # option text "3": A, decided and wrong
    assert s(1, " 12\n") == {"acc": 1.0, "path": "rule"}
    assert s(1, "There are 12 birds.") == {"acc": 0.0, "path": "none"}  # for the judge
    assert s(1, "13") == {"acc": 0.0, "path": "none"}  # prefetch decides only equal numbers
    assert s(1, "12.0") == {"acc": 0.0, "path": "none"}  # int("12.0") fails
    assert s(2, "1.250") == {"acc": 1.0, "path": "rule"}  # float equality; precision plays no part
    assert s(2, "1.3") == {"acc": 0.0, "path": "none"}  # 1.25 rounded to the row's precision 1 is not asked for
    assert s(3, "0") == {"acc": 0.0, "path": "none"}  # the prefetched 0 is falsy: left to the judge
    assert s(4, "cat") == {"acc": 0.0, "path": "none"}  # text answers are never prefetched
    out = scores_of(bench, items, {"1": "B", "2": "12", "3": "1.25", "4": "0", "5": "cat"})
    assert out["overall"] == {"acc": 0.6} and out["decided_by"] == {"none": 2, "rule": 3}
    assert out["per_skill"] == {"arithmetic reasoning": {"acc": 0.6}}
    with pytest.raises(DataError, match=r"row 0 field 'answer': '7' is not one of the choices"):
        bench.read(write_tsv(tmp_path / "b.tsv", [{**rows[0], "answer": "7"}]))


def test_ocrbench_tsv_and_release_json(tmp_path):
    hme = "Handwritten Mathematical Expression Recognition"
    rows = [dict(index=0, image=b64png(), question="What is written?", answer=str(["STOP"]), category="Regular Text Recognition"),
            dict(index=1, image=b64png(), question="Formula?", answer=str(["x^{2}"]), category=hme),
            dict(index=2, image=b64png(), question="Total?", answer=str(["$5", "5 dollars"]), category="Doc-oriented VQA")]
    bench = get_benchmark("ocrbench")
    items = bench.read(write_tsv(tmp_path / "OCRBench.tsv", rows))
    out = scores_of(bench, items, {"0": "it says stop.", "1": "x ^ { 2 }", "2": "4 dollars"})
    assert out["overall"] == {"score": 2.0, "acc": pytest.approx(2 / 3)}
    assert out["per_category"]["Text Recognition"] == {"correct": 1.0, "acc": 1.0}
    assert out["per_category"]["Doc-oriented VQA"] == {"correct": 0.0, "acc": 0.0}
    # a partial predictions file: accuracy over the scored items, missing ones reported, not counted wrong
    preds = {"0": "it says stop.", "1": "X^{2}"}
    part = bench.aggregate(items, {k: bench.score_item(items[int(k)], p) for k, p in preds.items()}, preds)
    assert part["overall"] == {"score": 1.0, "acc": 0.5} and part["count"] == 2
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    js = [{"dataset_name": "IIIT5K", "id": 0, "image_path": "a.jpg", "question": "what is written in the image?",
           "answers": "Kelix", "type": "Regular Text Recognition"}]
    (tmp_path / "OCRBench.json").write_text(json.dumps(js))
    items = bench.read(str(tmp_path / "OCRBench.json"), str(tmp_path))
    bench.check_images(items, "OCRBench.json")
    assert items[0].answer == ["Kelix"] and bench.score_item(items[0], "KELIX") == {"acc": 1.0}
    (tmp_path / "OCRBench.json").write_text(json.dumps([{**js[0], "type": None}]))
    with pytest.raises(DataError, match=r"OCRBench.json row 0 field 'type': missing"):
        bench.read(str(tmp_path / "OCRBench.json"))


def test_textvqa(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "abc.jpg")
    doc = {"dataset_name": "textvqa", "data": [
        {"question_id": 34602, "question": "what number is on the bus?", "image_id": "abc",
         "answers": ["2", "two", "2", "2", "route 2", "2", "2", "2", "2", "two"]},
        {"question_id": 34603, "question": "what brand?", "image_id": "abc", "answers": ["nokia"] * 2 + ["sony"] * 8}]}
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps(doc))
    bench = get_benchmark("textvqa")
    items = bench.read(str(tmp_path / "TextVQA_0.5.1_val.json"), str(tmp_path / "img"))
    bench.check_images(items, "TextVQA_0.5.1_val.json")
    assert items[0].id == 34602 and items[0].prompt == ("What number is on the bus?\n"
                                                         "Answer the question using a single word or phrase.")
    assert bench.score_item(items[0], "Two") == {"acc": 1.0}  # nine annotators say 2 or two
    assert bench.score_item(items[1], "Nokia.") == {"acc": pytest.approx(0.6)}  # 2 of 10, leave-one-out
    del doc["data"][1]["answers"]
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"TextVQA_0.5.1_val.json row 1 field 'answers': missing"):
        bench.read(str(tmp_path / "TextVQA_0.5.1_val.json"))


def test_chartqa(tmp_path):
    rows = [{"imgname": "c1.png", "query": "What is the peak value?", "label": "100"},
            {"imgname": "c1.png", "query": "Which year?", "label": "2019"},
            {"imgname": "c1.png", "query": "Which colour is the largest bar?", "label": "Blue"}]
    (tmp_path / "test_human.json").write_text(json.dumps(rows))
    bench = get_benchmark("chartqa")
    items = bench.read(str(tmp_path / "test_human.json"))
    assert [it.id for it in items] == [0, 1, 2] and items[0].category == "test_human"
    preds = {"0": "104.9", "1": "2019", "2": "blue"}  # 4.9% off: right
    assert scores_of(bench, items, preds)["overall"] == {"relaxed_acc": 1.0}
    preds = {"0": "105.1", "1": "1900", "2": "the blue one"}  # 5.1% off: wrong
    assert scores_of(bench, items, preds)["overall"] == {"relaxed_acc": 0.0}
    assert bench.score_item(items[1], "2020") == {"relaxed_acc": 1.0}  # years too are numbers, as in the reference
    with pytest.raises(DataError, match=r"test_human.json row 0 field 'image': image file"):
        bench.check_images(items, "test_human.json")
