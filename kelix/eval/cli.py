"""``kelix eval run|score|list``: answer a benchmark with a pipeline, rescore predictions, list benchmarks.

    kelix eval run --pipeline out/pipeline --benchmark textvqa --data TextVQA_0.5.1_val.json \\
        --images train_images --out runs/textvqa [--limit N] [--batch-size 8]
    kelix eval score --benchmark textvqa --data TextVQA_0.5.1_val.json --predictions runs/textvqa/predictions.jsonl \\
        --out runs/textvqa-rescored
    kelix eval list

Every file is read and every image decoded before the model loads: a bad row stops the run with one
line naming the file, the row and the field. ``run`` is resumable: a rerun answers only the items not
yet in ``<out>/predictions.jsonl``. See docs/eval.md for each benchmark's files, prompt and metric.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--benchmark", required=True, help="benchmark name (kelix eval list)")
    p.add_argument("--data", required=True, help="the benchmark's file (or folder) in its published format")
    p.add_argument("--images", default=None, help="image folder, for benchmarks whose files name images by path")
    p.add_argument("--limit", type=int, default=None, help="only the first N items (MMBench: N questions, all rotations)")
    p.add_argument("--out", required=True, help="output directory (predictions.jsonl, scores.json, scores.md)")
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible endpoint (.../v1) for the benchmarks whose "
                   "reference uses a judge (MCQ fallback, MathVista extraction; key from $OPENAI_API_KEY)")
    p.add_argument("--judge-model", default=None, help="the judge's model name")
    p.add_argument("--write-predictions", choices=("xlsx", "tsv", "csv"), default=None,
                   help="also write <out>/kelix_<data file name>.<format>, VLMEvalKit's prediction file")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kelix eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="answer (or render) a benchmark with an exported pipeline")
    r.add_argument("--pipeline", required=True, help="pipeline directory (KelixPipeline.save_pretrained)")
    _common(r)
    r.add_argument("--batch-size", type=int, default=8, help="questions answered together (default: %(default)s)")
    r.add_argument("--max-new-tokens", type=int, default=None, help="answer length cap (default: the benchmark's)")
    r.add_argument("--samples", type=int, default=None, help="images per prompt (generation; GenEval default 4)")
    r.add_argument("--seed", type=int, default=0, help="generation seed of prompt row 0 (row i: seed + i)")
    r.add_argument("--temperature", type=float, default=0.0, help="answer sampling temperature (default 0: greedy)")
    r.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    r.add_argument("--dtype", default=None, help="e.g. bfloat16")
    s = sub.add_parser("score", help="score existing predictions without a model")
    _common(s)
    s.add_argument("--predictions", required=True, help='predictions.jsonl ({"id": ..., "prediction": str} per line), or VLMEvalKit\'s '
                   'prediction file (.xlsx, .tsv, .csv with index and prediction columns; a .pkl is refused)')
    sub.add_parser("list", help="the benchmarks, their files and metrics")
    return p


def _items(a):
    from kelix.eval import get_benchmark

    bench = get_benchmark(a.benchmark)
    if a.judge_url or a.judge_model:
        from kelix.eval.judge import Judge

        if not (a.judge_url and a.judge_model):
            raise ValueError("give both --judge-url and --judge-model")
        bench.judge = Judge(a.judge_url, a.judge_model)
    items = bench.read(a.data, a.images)
    items = bench.limit(items, a.limit)
    bench.check_images(items, a.data)
    return bench, items


def _list() -> int:
    from kelix.eval.base import BENCHMARKS, get_benchmark, names

    for n in names():
        get_benchmark(n)
    width = max(len(n) for n in names()) + 2
    print(f"{'benchmark':<{width}}{'kind':<12}{'metrics':<34}files")
    for n in names():
        b = BENCHMARKS[n]
        print(f"{n:<{width}}{b.kind:<12}{', '.join(b.metrics) or '(its own scorer)':<34}{b.files}")
    return 0


def _model(a):
    import torch

    from kelix.eval.runner import PipelineModel
    from kelix.llm.generate import Sampling
    from kelix.pipeline import KelixPipeline

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with contextlib.redirect_stdout(sys.stderr):  # loaders print progress; stdout keeps the summary
        pipe = KelixPipeline.from_pretrained(a.pipeline, device=device, dtype=a.dtype)
    return PipelineModel(pipe, Sampling(temperature=a.temperature, seed=a.seed) if a.temperature else None)


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.cmd == "list":
        return _list()
    from kelix.eval.base import DataError
    from kelix.eval.judge import JudgeError
    from kelix.eval.runner import read_predictions, run, score

    try:
        if a.cmd == "score":  # the predictions first: a refused or missing file stops before the benchmark is read
            if not os.path.isfile(a.predictions) and not a.predictions.endswith(".pkl"):
                raise DataError(f"{a.predictions}: no such file")
            preds = {k: r["prediction"] for k, r in read_predictions(a.predictions).items()}
        bench, items = _items(a)  # every file and image checked before any model loads
        if a.cmd == "score":
            target = os.path.join(a.out, "predictions.jsonl")
            same = os.path.exists(target) and os.path.samefile(a.predictions, target)
            result = score(bench, items, preds, a.out, write_predictions=not same)  # a run's own file keeps its fields
        else:
            if a.samples is not None:
                if a.samples < 1:
                    raise ValueError(f"--samples {a.samples}: must be at least 1")
                bench.samples = a.samples
            bench.check_options()
            model = _model(a)
    except (DataError, ValueError, FileNotFoundError, JudgeError) as e:
        print(f"kelix eval: {e}", file=sys.stderr)
        return 2
    if a.cmd == "run":
        try:  # errors of the model itself keep their traceback
            result = run(model, bench, items, a.out, a.data, a.batch_size, a.max_new_tokens, a.seed)
        except (DataError, JudgeError) as e:
            print(f"kelix eval: {e}", file=sys.stderr)
            return 2
    if a.write_predictions:
        from kelix.eval.predfiles import write_prediction_file

        stem = os.path.splitext(os.path.basename(os.path.normpath(a.data)))[0]
        keys = {it.key for it in items}
        preds = {k: r["prediction"] for k, r in read_predictions(os.path.join(a.out, "predictions.jsonl")).items()
                 if k in keys}
        write_prediction_file(os.path.join(a.out, f"kelix_{stem}.{a.write_predictions}"), items, preds)
    overall = ", ".join(f"{k}={v:.4f}" for k, v in result["overall"].items()) or "images written (see manifest.json)"
    print(f"{bench.name}: {result['count']} item(s), {overall}; {a.out}/scores.md")
    return 0
