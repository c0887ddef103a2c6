"""The quickstart's scorecard: the held-out synthetic benchmarks, scored against the README's bars.

After training, ``kelix quickstart`` writes (or reuses) the held-out splits of
:mod:`kelix.eval.synthetic` under ``<out>/benchmarks``, answers and renders them with the assembled
pipeline through :func:`kelix.eval.runner.run` (predictions in ``<out>/eval/<benchmark>``), prints one
table of metric, value, bar and pass/fail, and records it in ``<out>/scores.json`` and as TensorBoard
scalars (``runs/quickstart/version_N``, tags ``scorecard/<benchmark>/<metric>``). The demo is the first
held-out item of synthetic-vqa and of synthetic-t2i, with the truth printed beside the model's output.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, replace

from kelix.eval.synthetic import SYNTHETIC


@dataclass(frozen=True)
class Bar:
    """One line of the scorecard.

    Args:
        min: the value the README promises (a fraction, met when ``value >= min``).
        at: where the value sits in the benchmark's scores: ``("per_category", cat, metric)`` or
            ``("overall", metric)``.
        label: what the printout calls it.
    """

    min: float
    at: tuple[str, ...]
    label: str


# The README's promises for a full `kelix quickstart` (issue 12); the slow test asserts every one.
BARS: dict[str, Bar] = {
    "synthetic-vqa/color": Bar(0.90, ("per_category", "color", "acc"), "colour questions, exact"),
    "synthetic-vqa/shape": Bar(0.80, ("per_category", "shape", "acc"), "shape questions, exact"),
    "synthetic-vqa/count": Bar(0.70, ("per_category", "count", "acc"), "count questions (1-3), exact"),
    "synthetic-ocr/char_acc": Bar(0.80, ("overall", "corpus_char_acc"), "character accuracy"),
    "synthetic-t2i/color": Bar(0.80, ("overall", "color"), "images of the prompt's colour"),
    "synthetic-t2i/shape": Bar(0.60, ("overall", "shape"), "images of the prompt's shape"),
}
EVAL_ITEMS = {"synthetic-vqa": 120, "synthetic-ocr": 120, "synthetic-t2i": 60}  # ~1 minute on 2 CPU cores
GEN_SAMPLING = dict(temperature=1.0, top_k=8)  # the LLM's draw of an image's codes (seeded per prompt)


def parse_items(text: str | None) -> dict[str, int]:
    """``--eval-items``: ``N`` (every benchmark), or ``vqa=N,ocr=N,t2i=N`` (the others keep their default)."""
    items = dict(EVAL_ITEMS)
    if not text:
        return items
    for part in text.split(","):
        key, _, value = part.rpartition("=")
        names = list(items) if not key else [f"synthetic-{key.strip().removeprefix('synthetic-')}"]
        if any(n not in items for n in names) or not value.strip().isdigit() or int(value) < 1:
            raise SystemExit(f"kelix quickstart: --eval-items {text!r}: expected N or vqa=N,ocr=N,t2i=N (N >= 1)")
        items.update(dict.fromkeys(names, int(value)))
    return items


def _rows(path: str) -> int:
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def ensure_benchmarks(root: str, counts: dict[str, int]) -> dict[str, str]:
    """``{name: data.jsonl}`` under ``root``: a split with at least the rows asked for is reused (its first
    ``n`` rows are exactly what a fresh ``n``-row split holds: rows are drawn in order from one stream)."""
    from kelix.eval.synthetic import write_benchmark

    paths = {}
    for name in SYNTHETIC:
        path = os.path.join(root, name, "data.jsonl")
        if not (os.path.isfile(path) and _rows(path) >= counts[name]):
            path = write_benchmark(name, root, counts[name])
        paths[name] = path
    return paths


def load_model(pipeline: str, gen: dict | None = None):
    """A :class:`~kelix.eval.runner.PipelineModel` (greedy answers) whose images draw with ``gen`` sampling."""
    import torch
    import transformers

    from kelix.eval.runner import PipelineModel
    from kelix.llm.generate import Sampling
    from kelix.pipeline import KelixPipeline

    transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar, once per load
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sampling = Sampling(**{**GEN_SAMPLING, **(gen or {})})

    class Model(PipelineModel):
        def render(self, prompts, seed=0):  # the runner seeds each prompt; the LLM's draw follows it
            return self.pipe.generate(list(prompts), seed=seed, sampling=replace(sampling, seed=seed))

    return Model(KelixPipeline.from_pretrained(pipeline, device=device))


def evaluate(model, bench_root: str, counts: dict[str, int], out: str, batch_size: int = 16) -> dict[str, dict]:
    """Every synthetic benchmark's scores (``kelix.eval.runner.run``'s result), predictions in ``out/<name>``.

    Earlier predictions are removed first: they belong to an earlier model (the runner would resume them)."""
    from kelix.eval import get_benchmark
    from kelix.eval.runner import run

    results = {}
    for name in SYNTHETIC:
        bench = get_benchmark(name)
        items = bench.limit(bench.read(bench_root), counts[name])
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
        t = time.time()
        results[name] = run(model, bench, items, os.path.join(out, name), bench_root, batch_size)
        results[name]["seconds"] = round(time.time() - t, 1)
    return results


def scorecard(results: dict[str, dict]) -> dict[str, dict]:
    """``{bar key: {"value", "bar", "pass"}}``; a metric missing from ``results`` is ``None`` and fails."""
    card = {}
    for key, bar in BARS.items():
        value = results.get(key.split("/")[0])
        for k in bar.at:
            value = value.get(k) if isinstance(value, dict) else None
        card[key] = {"value": value, "bar": bar.min, "pass": value is not None and value >= bar.min}
    return card


def format_scorecard(card: dict[str, dict], counts: dict[str, int] | None = None) -> str:
    """The printed table: one line per bar, then which bars were missed."""
    lines = ["scorecard (held-out synthetic benchmarks" + (", " + ", ".join(
        f"{n.split('-')[1]} {c} items" for n, c in counts.items()) if counts else "") + ")"]
    width = max(len(k) for k in card)
    lines.append(f"  {'metric':<{width}}  {'value':>6}  {'bar':>6}  result  what")
    for key, row in card.items():
        value = "   n/a" if row["value"] is None else f"{row['value']:6.1%}"
        lines.append(f"  {key:<{width}}  {value}  {row['bar']:>6.0%}  {'pass' if row['pass'] else 'FAIL':<6}  "
                     f"{BARS[key].label if key in BARS else ''}")
    missed = [k for k, r in card.items() if not r["pass"]]
    lines.append(f"all {len(card)} bars met" if not missed else
                 f"{len(missed)} of {len(card)} bars missed: {', '.join(missed)}")
    return "\n".join(lines)


def exit_status(card: dict[str, dict], require_bars: bool) -> int:
    """0, or 1 when ``require_bars`` and a bar is missed (the printout names them either way)."""
    return int(require_bars and not all(r["pass"] for r in card.values()))


def write_tensorboard(logdir: str, card: dict[str, dict], results: dict[str, dict], times: dict[str, float]) -> str:
    """Scalars in a new ``logdir/version_N``: ``scorecard/<key>`` per bar, ``eval/<benchmark>/[<category>/]<metric>``
    for every metric, ``time/<stage>_s``. Returns the version directory."""
    from torch.utils.tensorboard import SummaryWriter

    n = 0
    while os.path.exists(os.path.join(logdir, f"version_{n}")):
        n += 1
    path = os.path.join(logdir, f"version_{n}")
    with SummaryWriter(path) as w:
        for key, row in card.items():
            if row["value"] is not None:
                w.add_scalar(f"scorecard/{key}", row["value"], 0)
        w.add_scalar("scorecard/bars_met", sum(r["pass"] for r in card.values()), 0)
        for name, res in results.items():
            for metric, v in res.get("overall", {}).items():
                w.add_scalar(f"eval/{name}/{metric}", v, 0)
            for cat, metrics in res.get("per_category", {}).items():
                for metric, v in metrics.items():
                    w.add_scalar(f"eval/{name}/{cat}/{metric}", v, 0)
        for stage, s in times.items():
            w.add_scalar(f"time/{stage}_s", s, 0)
    return path


def _first(out: str, name: str) -> dict:
    from kelix.eval.runner import PREDICTIONS, read_predictions

    preds = read_predictions(os.path.join(out, name, PREDICTIONS))
    return next(iter(preds.values()))  # written in item order: the first held-out item


def demo(eval_dir: str, bench_root: str, out: str) -> dict:
    """The first held-out item of synthetic-vqa (answer beside truth; its image -> ``out/question.png``) and of
    synthetic-t2i (the generated image -> ``out/generated.png`` with the checker's verdict)."""
    from kelix.eval.base import load_image
    from kelix.eval.t2i_check import find_blobs

    vqa, t2i = _first(eval_dir, "synthetic-vqa"), _first(eval_dir, "synthetic-t2i")
    with open(os.path.join(bench_root, "synthetic-vqa", "data.jsonl")) as f:
        row = json.loads(f.readline())
    shutil.copyfile(os.path.join(bench_root, "synthetic-vqa", row["image"]), os.path.join(out, "question.png"))
    shutil.copyfile(t2i["prediction"], os.path.join(out, "generated.png"))
    blobs = find_blobs(load_image(t2i["prediction"]))
    truth = t2i["answer"]
    return {"question": vqa["prompt"], "answer": vqa["prediction"], "truth": vqa["answer"],
            "correct": bool(vqa["score"]["acc"]), "question_image": os.path.join(out, "question.png"),
            "prompt": t2i["prompt"], "image": os.path.join(out, "generated.png"),
            "prompt_truth": {k: truth[k] for k in ("color", "count", "shape")}, "verdict": t2i["score"],
            "found": [f"{b.color} {b.shape}" for b in blobs]}


def format_demo(d: dict) -> str:
    ok = lambda v: "ok" if v else "wrong"  # noqa: E731
    v, t, found = d["verdict"], d["prompt_truth"], d["found"]
    return "\n".join([
        "demo (the first held-out items):",
        f"  Q: {d['question']}   [{d['question_image']}]",
        f"     model: {d['answer']!r}   truth: {d['truth']!r}   {'correct' if d['correct'] else 'wrong'}",
        f"  prompt: {d['prompt']}   [{d['image']}]",
        f"     truth: {t['count']} x {t['color']} {t['shape']}   checker found {len(found)}: {', '.join(found) or '-'}"
        f"   colour {ok(v['color'])}, count {ok(v['count'])}, shape {ok(v['shape'])}",
    ])


def write_scores(path: str, card: dict, results: dict, counts: dict, stages: dict, seconds: dict, demo: dict) -> None:
    doc = {"passed": all(r["pass"] for r in card.values()), "bars": card, "benchmarks": results, "items": counts,
           "stages": stages, "seconds": seconds, "demo": demo}
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(path + ".tmp", path)
