"""The synthetic world the quickstart learns: its text tokenizer, scene layout, OCR typesetting, and
that the recipes' own filters accept every sample it makes."""

import os
import random
import subprocess
import sys

import numpy as np
import pytest
from omegaconf import OmegaConf

from kelix.data.synthetic import (
    BACKGROUNDS,
    IMAGE_SIZE,
    OCR_CELL,
    OCR_ROWS,
    TASKS,
    Scene,
    SyntheticData,
    make_sample,
    place_shapes,
    render_scene,
    world_sentences,
)
from kelix.data.text import load_text_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = os.path.join(ROOT, "recipes", "quickstart")


def _texts(meta: dict) -> list[str]:
    parts = meta.get("segments") or [p for m in meta["messages"] for p in
                                     ([{"type": "text", "text": m["content"]}] if isinstance(m["content"], str)
                                      else m["content"])]
    return [p["text"] for p in parts if p["type"] == "text"]


def test_every_word_of_the_world_is_one_token_and_other_text_falls_back_to_bytes():
    tok = load_text_tokenizer("builtin:synthetic")
    rng = random.Random(5)
    words = set()
    for task in ("ocr", "caption", "vqa", "t2i", "interleaved", "text"):
        for _ in range(40):
            for text in _texts(make_sample(task, rng, IMAGE_SIZE)[0]):
                ids = tok(text, add_special_tokens=False)["input_ids"]
                assert tok.decode(ids) == text
                # GPT-2 style: a word and its leading space are one token; punctuation is its own
                assert len(ids) == len(text.replace(",", " ,").replace(".", " .").replace("?", " ?").split())
                words.update(text.split())
    assert len(words) > 60
    odd = "Zyx 0,7 qu!"
    assert tok.decode(tok(odd, add_special_tokens=False)["input_ids"]) == odd  # byte fallback
    assert len(tok) < 640  # the quickstart backbones' vocab_size


def test_the_world_tokenizer_is_the_same_in_every_process():
    code = ("from kelix.data.text import load_text_tokenizer as f; import json; "
            "print(json.dumps(sorted(f('builtin:synthetic').get_vocab().items())))")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) > 1000


def test_world_sentences_cover_every_template():
    text = " ".join(world_sentences())
    for phrase in ("What color is the", "Which shape is", "How many shapes", "What text is in the image",
                   "Generate an image of two", "background", "And next"):
        assert phrase in text


@pytest.mark.parametrize("n", [1, 2, 3])
def test_shapes_never_overlap_and_stay_inside(n):
    rng = random.Random(n)
    for _ in range(200):
        w, h = rng.randint(*IMAGE_SIZE), rng.randint(*IMAGE_SIZE)
        spots = place_shapes(n, w, h, rng)
        assert len(spots) == n
        for cx, cy, r in spots:
            assert r >= 0.38 * min(w, h) / 2 - 2 and 0 <= cx - r and cx + r <= w and 0 <= cy - r and cy + r <= h
        for i in range(n):
            for j in range(i):
                (x1, y1, r1), (x2, y2, r2) = spots[i], spots[j]
                assert max(abs(x1 - x2), abs(y1 - y2)) >= r1 + r2  # disjoint boxes


def test_a_scene_draws_each_shape_in_its_colour():
    rng = random.Random(0)
    scene = Scene("white", [("red", "circle"), ("blue", "square"), ("green", "triangle")])
    img = np.asarray(render_scene(scene, 168, 168, rng)).astype(int)
    for rgb in ((220, 40, 40), (40, 80, 220), (40, 170, 60)):  # red, blue, green
        assert (np.abs(img - rgb).sum(-1) == 0).sum() > 0.05 * 84 * 84  # a large shape per quadrant
    assert (np.abs(img - BACKGROUNDS["white"]).sum(-1) == 0).mean() > 0.3


def test_ocr_words_start_on_the_token_grid():
    rng = random.Random(1)
    for _ in range(60):
        meta, (img,) = make_sample("ocr", rng, IMAGE_SIZE)
        assert img.width % OCR_CELL == 0 and img.height % OCR_CELL == 0
        a = np.asarray(img.convert("L")).astype(int)
        ink = np.nonzero((a < a[0, 0] - 60).any(0))[0]
        words = meta["messages"][1]["content"].split(" ")
        assert ink.size and ink[0] % OCR_CELL < 6  # the first word's first glyph sits at a cell's left edge
        rows = np.nonzero((a < a[0, 0] - 60).any(1))[0]
        assert rows[0] // OCR_CELL == rows[-1] // OCR_CELL  # glyphs inside one row of cells
        assert 1 <= len(words) <= 2


def test_ocr_images_are_one_line_of_cells():
    rng = random.Random(2)
    sizes = {make_sample("ocr", rng, IMAGE_SIZE)[1][0].size for _ in range(30)}
    assert {h for _, h in sizes} == {OCR_CELL * OCR_ROWS} and OCR_ROWS == 1
    assert {w // OCR_CELL for w, _ in sizes} == {5, 6}  # IMAGE_SIZE's 140-168 px, whole cells


def _qa(meta: dict) -> list[tuple[str, str]]:
    msgs = meta["messages"]
    q = [m["content"] if isinstance(m["content"], str) else m["content"][-1]["text"] for m in msgs[0::2]]
    return list(zip(q, [m["content"] for m in msgs[1::2]]))


def test_a_training_vqa_sample_asks_one_question_per_object_and_no_answer_twice():
    from kelix.data.synthetic import _vqa_all

    scene = Scene("white", [("red", "circle"), ("blue", "square"), ("red", "triangle")])
    seen = set()
    for seed in range(20):
        qa = _vqa_all(scene, random.Random(seed))
        assert qa.count(("How many shapes are in the image?", "three")) == 1 and len(qa) == 4
        # the red objects share their colour: only "What color is the circle/triangle?" asks about them
        assert ("What color is the circle?", "red") in qa and ("What color is the triangle?", "red") in qa
        blue = [x for x in qa if "square" in x[0] or "blue" in x[0]]
        assert blue in ([("What color is the square?", "blue")], [("Which shape is blue?", "square")])
        seen.add(blue[0][0])
    assert len(seen) == 2  # both kinds of question are asked about an object with a colour of its own
    rng = random.Random(3)
    for _ in range(40):
        meta, (img,) = make_sample("vqa", rng, IMAGE_SIZE)
        roles = [m["role"] for m in meta["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and 2 <= len(roles) // 2 <= 4
        first, *later = meta["messages"][0::2]
        assert first["content"][0] == {"type": "image", "image": "0.jpg"}  # the image comes once, first
        assert all(isinstance(m["content"], str) for m in later)
        qa = _qa(meta)
        assert len(set(qa)) == len(qa)
        # no answer can be copied from the conversation: "What color is the circle? red" never comes with
        # "Which shape is red? circle" (the shortcut that kept the LLM from reading the image)
        pairs = {(a, q.removeprefix("What color is the ").rstrip("?")) for q, a in qa if q.startswith("What color")}
        pairs |= {(q.removeprefix("Which shape is ").rstrip("?"), a) for q, a in qa if q.startswith("Which shape")}
        assert len(pairs) == len(qa) - 1


def test_a_benchmark_vqa_item_asks_one_question_with_one_answer():
    from kelix.data.synthetic import SHAPES, _vqa

    rng = random.Random(4)
    kinds = set()
    for _ in range(300):
        meta, _ = make_sample("vqa", rng, IMAGE_SIZE, turns="one")
        assert len(meta["messages"]) == 2
        (q, a), = _qa(meta)
        kinds.add(q.split()[0])
        if q.startswith("Which shape is"):
            assert a in SHAPES
    assert kinds == {"How", "What", "Which"}
    # two objects of one colour never get "which shape is <that colour>?" (it would have two answers)
    scene = Scene("gray", [("green", "circle"), ("green", "square")])
    asked = {_vqa(scene, random.Random(i))[0] for i in range(50)}
    assert "Which shape is green?" not in asked and "What color is the square?" in asked


def _processor(recipe: str, tmp: str):
    """The recipe's processor, built as LightningCLI would (interpolations resolved, image dicts)."""
    from kelix.data.images import ImageConfig

    cfg = OmegaConf.to_container(OmegaConf.load(os.path.join(RECIPES, recipe)), resolve=False)
    proc = cfg["data"]["init_args"]["processor"]
    args = dict(proc["init_args"])
    for k, v in list(args.items()):
        if isinstance(v, str) and v.startswith("${"):
            args[k] = "builtin:synthetic" if "tokenizer" in k or "init_from" in v else \
                cfg["model"]["init_args"]["tokenizer"]["image"] if k == "image" else 256
        if k in ("image", "gen_image") and isinstance(args[k], dict):
            args[k] = ImageConfig(**{kk: tuple(vv) if isinstance(vv, list) else vv for kk, vv in args[k].items()})
    module, name = proc["class_path"].rsplit(".", 1)
    import importlib

    return getattr(importlib.import_module(module), name)(**args), cfg["data"]["init_args"]


@pytest.mark.parametrize("recipe", ["tokenizer.yaml", "llm.yaml", "llm_stage2_2.yaml", "dit.yaml"])
def test_the_recipes_filters_accept_every_synthetic_sample(recipe, tmp_path):
    from kelix.data.stream import ShardStream

    proc, data = _processor(recipe, str(tmp_path))
    syn = dict(data["synthetic"], out_dir=str(tmp_path), samples_per_shard=40, shards_per_task=1)
    syn["tasks"] = [t for t in syn["tasks"] if t in TASKS]
    paths = SyntheticData(**syn).ensure()
    names = {os.path.basename(s["shards"] if isinstance(s, dict) else s).split("-")[0] for s in data["train"]}
    stream = ShardStream([p for p in paths if os.path.basename(p).split("-")[0] in names], processor=proc,
                         repeat=False, shuffle_buffer=1)
    items = list(stream)
    assert len(items) == 40 * len(names)
    assert not {k: v for k, v in stream.stats.items() if k.startswith("skipped/") and v}
