"""The dense-digits task: what is rendered is the truth (each glyph in its own 14 px patch, four per merged
28 px patch), samples parse as the kit's schema, and training shards never hold a held-out string."""

import json
import random
import tarfile

import numpy as np
import pytest
from PIL import Image

from kelix.data import synthetic_dense as sd
from kelix.data.schema import parse_sample
from kelix.data.synthetic import make_sample, write_shard


def _reference_glyphs(paper, ink) -> dict[str, np.ndarray]:
    """Each digit rendered alone in a 14 px cell, as render_dense centres it."""
    from PIL import ImageDraw, ImageFont

    font, out = ImageFont.load_default(size=sd.GLYPH_FONT), {}
    for ch in sd.ALPHABET:
        img = Image.new("RGB", (sd.GLYPH_CELL, sd.GLYPH_CELL), paper)
        draw = ImageDraw.Draw(img)
        left, top, right, bottom = draw.textbbox((0, 0), ch, font=font)
        draw.text(((sd.GLYPH_CELL - (right - left)) // 2 - left, (sd.GLYPH_CELL - (bottom - top)) // 2 - top), ch,
                  font=font, fill=ink)
        out[ch] = np.asarray(img, dtype=np.float32)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_rendered_glyphs_are_the_answer(seed):
    rng = random.Random(seed)
    answer = sd.random_answer(rng)
    img, (col, row) = sd.render_dense(answer, rng)
    assert img.size == (sd.SIDE, sd.SIDE)
    a = np.asarray(img, dtype=np.float32)
    paper = tuple(int(v) for v in a[0, 0])
    assert paper in sd.PAPERS
    ink_mask = np.abs(a - a[0, 0]).sum(-1) > 60
    ys, xs = np.nonzero(ink_mask)
    ink = tuple(int(v) for v in a[ys[0], xs[0]])
    ink = min(sd.INKS, key=lambda c: sum((p - q) ** 2 for p, q in zip(c, ink)))
    refs = _reference_glyphs(paper, ink)
    boxes = sd.glyph_boxes(col, row)
    covered = np.zeros_like(ink_mask)
    read = []
    for line in boxes:
        text = ""
        for x0, y0, x1, y1 in line:
            crop = a[y0:y1, x0:x1]
            text += min(refs, key=lambda ch: float(((crop - refs[ch]) ** 2).sum()))  # nearest reference glyph
            assert ink_mask[y0:y1, x0:x1].any()  # every cell holds ink
            covered[y0:y1, x0:x1] = True
        read.append(text)
    assert " ".join(read) == answer
    assert not (ink_mask & ~covered).any()  # no ink outside the glyph cells
    # the block sits on the merged grid: each covered merged patch holds exactly 2 x 2 glyphs
    assert boxes[0][0][:2] == (col * sd.MERGED, row * sd.MERGED)
    patches = {(x0 // sd.MERGED, y0 // sd.MERGED) for line in boxes for x0, y0, _, _ in line}
    assert len(patches) * 4 == sd.LINES * sd.LINE_CHARS


def test_answers_split_and_form():
    rng = random.Random(1)
    train = [sd.random_answer(rng, "train") for _ in range(300)]
    held = [sd.random_answer(rng, "eval") for _ in range(100)]
    assert not any(sd.is_held_out(a) for a in train) and all(sd.is_held_out(a) for a in held)
    assert all(len(a) == 9 and a[4] == " " and a.replace(" ", "").isdigit() for a in train + held)
    with pytest.raises(ValueError, match="split"):
        sd.random_answer(rng, "test")
    with pytest.raises(ValueError, match="lines"):
        sd.render_dense("123 456", rng)


def test_training_shards_hold_no_benchmark_answer(tmp_path):
    from kelix.eval.synthetic_dense import write_dense_benchmark

    path = tmp_path / "dense-00000.tar"
    write_shard(str(path), "dense", 400, 0, (140, 168))
    answers = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            if m.name.endswith(".json"):
                meta = json.load(tar.extractfile(m))
                answers.append(meta["messages"][1]["content"])
    assert len(answers) == 400 and not any(sd.is_held_out(a) for a in answers)
    bench = write_dense_benchmark(str(tmp_path / "bench"), 50)
    held = [json.loads(line)["answer"] for line in open(bench)]
    assert len(held) == 50 and all(sd.is_held_out(a) for a in held) and not set(held) & set(answers)


def test_sample_parses_as_the_schema():
    meta, images = make_sample("dense", random.Random(3), (140, 168))
    sample = parse_sample({"json": meta, "0.jpg": images[0]}, "dense.tar", "k")
    assert sample.task == "ocr" and images[0].size == (sd.SIDE, sd.SIDE)
    assert meta["messages"][0]["content"][1]["text"] == sd.QUESTION
