"""Generation benchmarks scored by their own scorers: GenEval, DPG-Bench, WISE.

``kelix eval run`` writes the images in the layout each scorer reads (one prompt at a time, so a rerun
skips finished prompts) and a manifest.json; docs/eval.md gives each scorer's command.

* GenEval: ``evaluation_metadata.jsonl`` -> ``<out>/<00000>/metadata.jsonl`` (the prompt's line) and
  ``<out>/<00000>/samples/00000.png`` ... (4 samples per prompt by default);
* DPG-Bench: ``dpg_bench.csv`` (or its ``prompts/`` folder of ``<item_id>.txt``) -> ``<out>/<item_id>.png``,
  a 2x2 grid of 4 samples;
* WISE: its prompt JSON(s) (``prompt_id``, ``Prompt``) -> ``<out>/<prompt_id>.png``.
"""

from __future__ import annotations

import csv
import glob
import json
import os

from kelix.eval.base import Benchmark, DataError, Item, register, where


class _External(Benchmark):
    kind = "generate"
    metrics = ()
    samples = 1

    def score_item(self, item, prediction):
        return {}  # the benchmark's own scorer reads the images

    def _save(self, images, paths):
        for im, p in zip(images, paths):
            os.makedirs(os.path.dirname(p), exist_ok=True)
            im.save(p + ".tmp.png")
            os.replace(p + ".tmp.png", p)  # a finished file is a finished sample


@register
class GenEval(_External):
    name = "geneval"
    files = "GenEval prompts/evaluation_metadata.jsonl"
    layout = "<out>/<00000>/metadata.jsonl + samples/<00000>.png"
    scorer = "geneval: python evaluation/evaluate_images.py <out> --outfile results.jsonl --model-path <detector>"
    samples = 4

    def read(self, data, images=None):
        if not os.path.isfile(data):
            raise DataError(f"{data}: no such file")
        items = []
        with open(data, encoding="utf-8") as f:
            for i, line in enumerate(x for x in f if x.strip()):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where(data, i)}: not JSON ({e})") from None
                if not isinstance(row.get("prompt"), str) or not row["prompt"]:
                    raise DataError(f"{where(data, i, 'prompt')}: missing")
                items.append(Item(i, row["prompt"], row, category=str(row.get("tag", ""))))
        return items

    def generate_item(self, model, item, out, seed):
        folder = os.path.join(out, f"{item.id:05d}")
        paths = [os.path.join(folder, "samples", f"{k:05d}.png") for k in range(self.samples)]  # as GenEval writes them
        self._save(model.render([item.prompt] * self.samples, seed=seed), paths)
        with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
            f.write(json.dumps(item.answer) + "\n")
        return folder


def grid(images):
    """Four images as one 2x2 grid (DPG-Bench's scorer splits it back)."""
    from PIL import Image

    w, h = images[0].size
    out = Image.new("RGB", (2 * w, 2 * h))
    for k, im in enumerate(images[:4]):
        out.paste(im, ((k % 2) * w, (k // 2) * h))
    return out


@register
class DPGBench(_External):
    name = "dpg-bench"
    files = "DPG-Bench dpg_bench.csv (item_id, text) or its prompts/ folder"
    layout = "<out>/<item_id>.png (2x2 grid of 4 samples)"
    scorer = "dpg_bench: compute_dpg_bench.py --image-root-path <out> --resolution <side> --pic-num 4"
    samples = 4

    def read(self, data, images=None):
        if os.path.isdir(data):
            files = sorted(glob.glob(os.path.join(data, "*.txt")))
            if not files:
                raise DataError(f"{data}: no <item_id>.txt prompt files")
            return [Item(os.path.splitext(os.path.basename(p))[0], open(p, encoding="utf-8").read().strip())
                    for p in files]
        if not os.path.isfile(data):
            raise DataError(f"{data}: no such file")
        with open(data, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        for k in ("item_id", "text"):
            if not rows or k not in rows[0]:
                raise DataError(f"{where(data, None, k)}: missing column")
        seen: dict[str, Item] = {}
        for i, r in enumerate(rows):  # one row per question; the prompt repeats per item_id
            if not r["text"].strip():
                raise DataError(f"{where(data, i, 'text')}: empty")
            seen.setdefault(r["item_id"], Item(r["item_id"], r["text"].strip(), category=r.get("category_broad", "")))
        return list(seen.values())

    def check_options(self):
        if self.samples != 4:
            raise ValueError(f"dpg-bench writes a 2x2 grid: --samples must be 4, not {self.samples}")

    def generate_item(self, model, item, out, seed):
        self.check_options()
        path = os.path.join(out, f"{item.key}.png")
        self._save([grid(model.render([item.prompt] * 4, seed=seed))], [path])
        return path


@register
class WISE(_External):
    name = "wise"
    files = "WISE data/*.json (prompt_id, Prompt), one file or their folder"
    layout = "<out>/<prompt_id>.png"
    scorer = "WISE: gpt_eval.py --json_path data/<part>.json --image_dir <out> --output_dir ... (a GPT-4o judge)"

    def read(self, data, images=None):
        files = sorted(glob.glob(os.path.join(data, "*.json"))) if os.path.isdir(data) else [data]
        items = []
        for path in files:
            if not os.path.isfile(path):
                raise DataError(f"{path}: no such file")
            try:
                rows = json.load(open(path, encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not JSON ({e})") from None
            for i, r in enumerate(rows if isinstance(rows, list) else []):
                prompt = r.get("Prompt", r.get("prompt")) if isinstance(r, dict) else None
                if "prompt_id" not in r or not prompt:
                    raise DataError(f"{where(path, i, 'prompt_id' if 'prompt_id' not in r else 'Prompt')}: missing")
                items.append(Item(r["prompt_id"], prompt, category=str(r.get("Category", r.get("Subcategory", "")))))
        return items

    def generate_item(self, model, item, out, seed):
        path = os.path.join(out, f"{item.key}.png")
        self._save(model.render([item.prompt], seed=seed), [path])
        return path
