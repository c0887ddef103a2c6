"""GenEval / DPG-Bench / WISE writers: their scorers' layouts, recorded seeds, resuming per prompt."""

import json

import numpy as np
import pytest
from PIL import Image

from kelix.eval import get_benchmark
from kelix.eval.base import DataError
from kelix.eval.runner import run


class Painter:
    """Sample k of a render call is a flat image whose colour encodes (seed, k); fails after ``fail_after`` calls."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = [], fail_after

    def render(self, prompts, seed=0):
        if self.fail_after is not None and len(self.calls) == self.fail_after:
            raise KeyboardInterrupt
        self.calls.append((list(prompts), seed))
        return [Image.new("RGB", (8, 6), (seed % 256, k * 40, 7)) for k in range(len(prompts))]


GENEVAL = [{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
           {"tag": "counting", "include": [{"class": "cat", "count": 2}], "prompt": "a photo of two cats"},
           {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"}]


def test_geneval_layout_seeds_and_resume(tmp_path):
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text("".join(json.dumps(r) + "\n" for r in GENEVAL))
    bench = get_benchmark("geneval")
    items = bench.read(str(meta))
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(Painter(fail_after=2), bench, items, str(out), str(meta), seed=10, progress=False)
    painter = Painter()
    result = run(painter, bench, items, str(out), str(meta), seed=10, progress=False)
    assert painter.calls == [(["a photo of a red car"] * 4, 12)]  # only the unfinished prompt, with its own seed
    for i, row in enumerate(GENEVAL):
        folder = out / f"{i:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == row  # what GenEval's scorer reads
        samples = sorted((folder / "samples").iterdir())
        assert [p.name for p in samples] == ["00000.png", "00001.png", "00002.png", "00003.png"]
        assert Image.open(samples[1]).getpixel((0, 0)) == (10 + i, 40, 7)
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["seed"] for p in preds] == [10, 11, 12]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples_per_prompt"] == 4 and manifest["seed"] == 10 and manifest["prompts"] == 3
    assert result["overall"] == {} and "own scorer" in (out / "scores.md").read_text()


def test_dpg_bench_grid_from_csv_and_folder(tmp_path, capsys):
    csv = tmp_path / "dpg_bench.csv"
    csv.write_text("item_id,text,keywords,proposition_id,dependency,category_broad,category_detailed,tuple,"
                   "question_natural_language\n"
                   "a1,A red fox in snow.,fox,1,0,entity,whole,entity - whole (fox),Is there a fox?\n"
                   "a1,A red fox in snow.,fox,2,1,attribute,color,attribute - color (fox),Is the fox red?\n"
                   "b2,Two chairs by a window.,chair,1,0,entity,whole,entity - whole (chair),Are there chairs?\n")
    bench = get_benchmark("dpg-bench")
    items = bench.read(str(csv))
    assert [(it.id, it.prompt) for it in items] == [("a1", "A red fox in snow."), ("b2", "Two chairs by a window.")]
    run(Painter(), bench, items, str(tmp_path / "out"), str(csv), seed=3, progress=False)
    grid = np.asarray(Image.open(tmp_path / "out" / "b2.png"))
    assert grid.shape == (12, 16, 3)
    quadrants = [grid[:6, :8], grid[:6, 8:], grid[6:, :8], grid[6:, 8:]]
    assert [tuple(q[0, 0]) for q in quadrants] == [(4, 0, 7), (4, 40, 7), (4, 80, 7), (4, 120, 7)]
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "a1.txt").write_text("A red fox in snow.\n")
    assert [(it.id, it.prompt) for it in bench.read(str(folder))] == [("a1", "A red fox in snow.")]
    from kelix.cli import main

    assert main(["eval", "run", "--pipeline", "nowhere", "--benchmark", "dpg-bench", "--data", str(csv),
                 "--out", str(tmp_path / "o"), "--samples", "2"]) == 2  # refused before any model loads
    assert capsys.readouterr().err.strip() == "kelix eval: dpg-bench writes a 2x2 grid: --samples must be 4, not 2"
    (tmp_path / "bad.csv").write_text("item,text\nx,y\n")
    with pytest.raises(DataError, match=r"bad.csv field 'item_id': missing column"):
        bench.read(str(tmp_path / "bad.csv"))


def test_wise_one_image_per_prompt_id(tmp_path):
    rows = [{"prompt_id": 1, "Prompt": "The tallest building in Dubai", "Category": "Cultural knowledge"},
            {"prompt_id": 2, "Prompt": "Ice left in the sun for an hour", "Category": "Natural science"}]
    (tmp_path / "natural_science.json").write_text(json.dumps(rows))
    bench = get_benchmark("wise")
    items = bench.read(str(tmp_path))
    run(Painter(), bench, items, str(tmp_path / "out"), str(tmp_path), progress=False)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["1.png", "2.png"]
    (tmp_path / "natural_science.json").write_text(json.dumps([{"prompt_id": 3}]))
    with pytest.raises(DataError, match=r"natural_science.json row 0 field 'Prompt': missing"):
        bench.read(str(tmp_path))
