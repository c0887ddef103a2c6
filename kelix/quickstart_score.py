"""The quickstart's scorecard: the held-out synthetic benchmarks, each score beside chance and its guard.

After training, ``kelix quickstart`` writes (or reuses) the held-out splits of
:mod:`kelix.eval.synthetic` under ``<out>/benchmarks``, answers and renders them with the assembled
pipeline through :func:`kelix.eval.runner.run` (predictions in ``<out>/eval/<benchmark>``), prints one
table of each metric beside chance, what longer runs reach and its regression guard, and records it
in ``<out>/scores.json`` and as TensorBoard
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
class Guard:
    """One line of the scorecard: a regression guard, not a quality target.

    Args:
        min: the guard: every correct quickstart on a quiet 2-core CPU meets it with margin (measured over
            3 runs, docs/quickstart.md); a value below it means something broke (met when ``value >= min``).
        at: where the value sits in the benchmark's scores: ``("per_category", cat, metric)`` or
            ``("overall", metric)``.
        label: what the printout calls it.
        chance: what guessing scores (a uniform answer among the world's 7 colours, 3 shapes, counts 1-3);
            ``None`` where guessing has no rate (characters read).
        longer: the best that longer runs reached (docs/quickstart.md: stage 2.2 alone at 2-5x the
            quickstart's compute; the DiT at 3x its steps, given the true image's codes).
        near_chance: printed under the table while the value is within 10 points of chance: why that is
            expected of a correct 8-minute run.
    """

    min: float
    at: tuple[str, ...]
    label: str
    chance: float | None
    longer: float
    near_chance: str = ""


# Measured over 3 quiet 2-core runs and one of another seed (docs/quickstart.md, "Regression guards"); the slow
# test asserts every one, and that a pipeline with its visual table or its DiT condition shuffled misses them.
GUARDS: dict[str, Guard] = {
    "synthetic-vqa/color": Guard(0.50, ("per_category", "color", "acc"), "colour questions, exact", 1 / 7, 0.733),
    "synthetic-vqa/shape": Guard(0.25, ("per_category", "shape", "acc"), "shape questions, exact", 1 / 3, 0.459,
                                 "the tiny LLM learns which shapes a picture holds before which is which"),
    "synthetic-vqa/count": Guard(0.70, ("per_category", "count", "acc"), "count questions (1-3), exact", 1 / 3, 1.0),
    "synthetic-ocr/char_acc": Guard(0.30, ("overall", "corpus_char_acc"), "character accuracy", None, 0.955),
    "synthetic-t2i/color": Guard(0.45, ("overall", "color"), "images of the prompt's colour", 1 / 7, 1.0),
    "synthetic-t2i/shape": Guard(0.05, ("overall", "shape"), "images of the prompt's shape", 1 / 3, 0.175,
                                 "the 3-minute DiT draws blobs of the right colour"),
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
    """``{guard key: {"value", "guard", "chance", "longer", "pass"}}``; a metric missing from ``results`` is
    ``None`` and misses its guard (a benchmark that did not run must not pass unseen)."""
    card = {}
    for key, g in GUARDS.items():
        value = results.get(key.split("/")[0])
        for k in g.at:
            value = value.get(k) if isinstance(value, dict) else None
        card[key] = {"value": value, "guard": g.min, "chance": g.chance, "longer": g.longer,
                     "pass": value is not None and value >= g.min}
    return card


def _pct(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}%}"


def format_scorecard(card: dict[str, dict], counts: dict[str, int] | None = None) -> str:
    """The printed table: each score beside chance, the longest runs and its guard; why a score sits near
    chance; then one line that says whether the run is sound."""
    lines = ["scorecard (held-out synthetic benchmarks" + (", " + ", ".join(
        f"{n.split('-')[1]} {c} items" for n, c in counts.items()) if counts else "") + ")"]
    width = max(len(k) for k in card)
    lines.append(f"  {'metric':<{width}}  {'score':>6}  {'chance':>6}  {'longer':>6}  {'guard':>5}  {'':<5}  what")
    notes = []
    for key, row in card.items():
        g = GUARDS.get(key)
        lines.append(f"  {key:<{width}}  {_pct(row['value']):>6}  {_pct(row['chance']):>6}  "
                     f"{_pct(row['longer'], 0):>6}  {_pct(row['guard'], 0):>5}  {'ok' if row['pass'] else 'BELOW':<5}  "
                     f"{g.label if g else ''}")
        if g and g.near_chance and row["chance"] is not None and row["value"] is not None \
                and row["value"] < row["chance"] + 0.1:
            notes.append(f"  {key} at chance is expected of a correct run: {g.near_chance}")
    missed = [k for k, r in card.items() if not r["pass"]]
    lines += [] if missed else notes  # a broken run's scores need no excuse
    lines.append("  chance: guessing; longer: the best of longer runs (docs/quickstart.md); guard: what every "
                 "correct run meets")
    lines.append(f"all {len(card)} guards met: the pipeline learned what an 8-minute CPU run learns"
                 if not missed else f"{len(missed)} of {len(card)} guards missed ({', '.join(missed)}): a correct "
                 "quickstart meets every guard, so something is broken (docs/quickstart.md, Regression guards)")
    return "\n".join(lines)


def exit_status(card: dict[str, dict], require_bars: bool) -> int:
    """0, or 1 when ``require_bars`` and a guard is missed (the printout names them either way)."""
    return int(require_bars and not all(r["pass"] for r in card.values()))


def write_tensorboard(logdir: str, card: dict[str, dict], results: dict[str, dict], times: dict[str, float]) -> str:
    """Scalars in a new ``logdir/version_N``: ``scorecard/<key>`` per guard, ``eval/<benchmark>/[<category>/]<metric>``
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
        w.add_scalar("scorecard/guards_met", sum(r["pass"] for r in card.values()), 0)
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
    doc = {"passed": all(r["pass"] for r in card.values()), "guards": card, "benchmarks": results, "items": counts,
           "stages": stages, "seconds": seconds, "demo": demo}
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(path + ".tmp", path)
