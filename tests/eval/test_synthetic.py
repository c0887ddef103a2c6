"""The synthetic benchmark suite: held-out splits, their scorers and the deterministic t2i checker."""

import io
import json
import random

import numpy as np
import pytest
from PIL import Image

from kelix.data.synthetic import COLORS, IMAGE_SIZE, SHAPES, make_sample
from kelix.eval import get_benchmark
from kelix.eval.synthetic import PLURAL, render_t2i, t2i_text, write_benchmark
from kelix.eval.t2i_check import check_image, find_blobs


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    for name in ("synthetic-vqa", "synthetic-ocr", "synthetic-t2i"):
        write_benchmark(name, str(root), n=60)
    return root


def test_splits_are_deterministic_and_read_back(suite, tmp_path):
    for name in ("synthetic-vqa", "synthetic-ocr"):
        write_benchmark(name, str(tmp_path), n=60)
        assert (tmp_path / name / "data.jsonl").read_text() == (suite / name / "data.jsonl").read_text()
        items = get_benchmark(name).read(str(suite))
        assert len(items) == 60 and len({it.key for it in items}) == 60
        get_benchmark(name).check_images(items, str(suite))
    vqa = get_benchmark("synthetic-vqa").read(str(suite))
    assert {it.category for it in vqa} == {"color", "shape", "count"}
    for it in vqa:
        assert it.category != "count" or it.answer in ("one", "two", "three")


def test_held_out_images_are_not_training_images(suite):
    """Training shards of seed 0 draw from '<seed>:<task>:<shard>': no benchmark picture is one of them."""
    for task in ("vqa", "ocr"):
        train = set()
        for shard in range(2):
            rng = random.Random(f"{shard}:{task}:{task}-{shard:05d}.tar")
            for _ in range(64):
                train.add(make_sample(task, rng, IMAGE_SIZE)[1][0].tobytes())
        rows = [json.loads(x) for x in (suite / f"synthetic-{task}" / "data.jsonl").read_text().splitlines()]
        held = {Image.open(suite / f"synthetic-{task}" / r["image"]).convert("RGB").tobytes() for r in rows}
        assert not held & train


def test_vqa_and_ocr_scores():
    vqa, ocr = get_benchmark("synthetic-vqa"), get_benchmark("synthetic-ocr")
    from kelix.eval.base import Item

    assert vqa.score_item(Item(0, "How many shapes are in the image?", "two"), "Two") == {"acc": 1.0}
    assert vqa.score_item(Item(0, "How many shapes are in the image?", "two"), "2") == {"acc": 1.0}
    assert vqa.score_item(Item(0, "What color is the circle?", "red"), "blue") == {"acc": 0.0}
    # exact after normalisation: containing the answer is not enough
    assert vqa.score_item(Item(0, "What color is the circle?", "red"), "red and blue") == {"acc": 0.0}
    assert vqa.score_item(Item(0, "What color is the circle?", "red"), "The red.") == {"acc": 1.0}
    items = [Item(0, "q", "kelix"), Item(1, "q", "river stone")]
    scores = {"0": ocr.score_item(items[0], "kelik"), "1": ocr.score_item(items[1], "river stone")}
    assert scores["0"] == {"exact": 0.0, "char_acc": pytest.approx(0.8)}  # 1 substitution in 5 characters
    out = ocr.aggregate(items, scores, {"0": "kelik", "1": "river stone"})
    assert out["overall"]["char_acc"] == pytest.approx(0.9)
    assert out["overall"]["corpus_char_acc"] == pytest.approx(1 - 1 / 16)  # 1 edit over 16 characters


def _jpeg(img, quality=80):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_checker_scores_ground_truth_100_percent(suite):
    bench = get_benchmark("synthetic-t2i")
    items = bench.read(str(suite))
    rows = [json.loads(x) for x in (suite / "synthetic-t2i" / "data.jsonl").read_text().splitlines()]
    assert {r["count"] for r in rows} == {1, 2, 3} and {r["shape"] for r in rows} == set(SHAPES)
    for it, r in zip(items, rows):
        path = str(suite / "synthetic-t2i" / r["image"])
        assert bench.score_item(it, path) == {"color": 1.0, "count": 1.0, "shape": 1.0, "overall": 1.0}, r
        # and after lossy compression, as a generator's output would be
        assert check_image(_jpeg(Image.open(path)), r["color"], r["count"], r["shape"])["overall"] == 1.0, r


def test_checker_scores_wrong_images_0_percent():
    rng = random.Random(7)
    colors = list(COLORS)
    for k in range(40):
        color, count, shape = colors[k % len(colors)], 1 + k % 4, SHAPES[k % 3]
        other_color = colors[(k + 1 + k % 5) % len(colors)]
        other_shape = SHAPES[(k + 1 + k % 2) % 3]
        other_count = count % 4 + 1
        wrong = {"color": render_t2i(other_color, count, shape, 128, rng),
                 "count": render_t2i(color, other_count, shape, 128, rng),
                 "shape": render_t2i(color, count, other_shape, 128, rng)}
        for attr, img in wrong.items():
            s = check_image(img, color, count, shape)
            assert s[attr] == 0.0 and s["overall"] == 0.0, (attr, color, count, shape)
            assert sum(s.values()) == 2.0  # the two attributes drawn right are still right
    blank = Image.new("RGB", (64, 64), "white")
    assert check_image(blank, "red", 1, "circle") == {"color": 0.0, "count": 0.0, "shape": 0.0, "overall": 0.0}


def test_checker_ignores_specks_and_reads_shapes():
    img = render_t2i("blue", 2, "triangle", 160, random.Random(0))
    x = np.asarray(img).copy()
    x[3, 3] = (255, 0, 0)  # one stray pixel is not an object
    blobs = find_blobs(Image.fromarray(x))
    assert [b.shape for b in blobs] == ["triangle", "triangle"] and [b.color for b in blobs] == ["blue", "blue"]


def test_prompt_text():
    assert t2i_text("red", 1, "circle") == "a red circle"
    assert t2i_text("blue", 2, "square") == "two blue squares"
    assert set(PLURAL) == set(SHAPES)


def test_bad_rows_are_named(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"id": 0, "prompt": "x", "color": "pink", "count": 1, "shape": "circle"}\n')
    with pytest.raises(ValueError, match=r"data.jsonl row 0: color/shape/count 'pink'"):
        get_benchmark("synthetic-t2i").read(str(tmp_path))
    (tmp_path / "data.jsonl").write_text('{"id": 0, "image": "a.png", "question": "q"}\n')
    with pytest.raises(ValueError, match=r"data.jsonl row 0 field 'answer': missing"):
        get_benchmark("synthetic-vqa").read(str(tmp_path))
    (tmp_path / "data.jsonl").write_text('{"id": 0, "image": "a.png", "question": "q", "answer": "a"}\n')
    (tmp_path / "a.png").write_bytes(b"not a png")
    items = get_benchmark("synthetic-vqa").read(str(tmp_path))
    with pytest.raises(ValueError, match=r"row 0 field 'image': image does not decode"):
        get_benchmark("synthetic-vqa").check_images(items, str(tmp_path))


def test_make_synthetic_writes_the_benchmarks(tmp_path):
    from kelix.cli import main

    out = tmp_path / "data"
    assert main(["make-synthetic", "--out", str(out), "--tasks", "text", "--shards-per-task", "1",
                 "--samples-per-shard", "2", "--benchmarks", "3"]) == 0
    write_benchmark("synthetic-vqa", str(tmp_path / "ref"), n=3)
    for name in ("synthetic-vqa", "synthetic-ocr", "synthetic-t2i"):
        assert len(get_benchmark(name).read(str(out / "benchmarks"))) == 3
    assert (out / "benchmarks" / "synthetic-vqa" / "data.jsonl").read_text() == \
        (tmp_path / "ref" / "synthetic-vqa" / "data.jsonl").read_text()  # the same split, whatever --seed
