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
    rows = [dict(index=1, image=str([b64png(), b64png((0, 200, 0))]), question="<image 1> vs <image 2>: which is red?",
                 A="left", B="right", answer="A", category="Art"),
            dict(index=2, image=b64png(), question="How many litres?", A="", B="", answer="2.50", category="Physics"),
            dict(index=3, image=b64png(), question="Which city?", A="", B="", answer="Paris", category="Geography")]
    bench = get_benchmark("mmmu")
    items = bench.read(write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", rows))
    assert len(items[0].images) == 2 and items[1].meta["open"] and items[1].prompt == "Question: How many litres?\n"
    preds = {"1": "(A) left", "2": "It holds 2.5 litres", "3": "the city of paris"}
    assert scores_of(bench, items, preds)["overall"] == {"acc": 1.0}
    preds = {"1": "B", "2": "2.6", "3": "London"}
    assert scores_of(bench, items, preds)["overall"] == {"acc": 0.0}


def test_mathvista(tmp_path):
    common = dict(image=b64png(), task="figure QA", precision="")
    rows = [dict(index=1, question="Which is larger? Choices: (A) 3 (B) 5", answer="5", question_type="multi_choice",
                 answer_type="text", choices=str(["3", "5"]), **common),
            dict(index=2, question="How many?", answer="12", question_type="free_form", answer_type="integer",
                 choices="", **common),
            dict(index=3, question="Length?", answer="1.25", question_type="free_form", answer_type="float",
                 choices="", **{**common, "precision": "2"})]
    bench = get_benchmark("mathvista")
    items = bench.read(write_tsv(tmp_path / "MathVista_MINI.tsv", rows))
    good = {"1": "The answer is B", "2": "There are 12 birds.", "3": "about 1.25 cm"}
    assert scores_of(bench, items, good)["overall"] == {"acc": 1.0}
    bad = {"1": "3", "2": "13", "3": "1.3"}
    assert scores_of(bench, items, bad)["overall"] == {"acc": 0.0}
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
    assert items[0].id == 34602 and items[0].prompt == ("what number is on the bus?\n"
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
