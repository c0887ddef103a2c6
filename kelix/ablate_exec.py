"""Running the plan of :mod:`kelix.ablate`: each stage in its own process, one bar and one line per run.

``fork`` (default): the parent imports the kit once, then forks a child per stage, whose stdout and
stderr go through a pipe to ``<out>/logs/<stage>.log`` while the parent drives the run's bar from the
child's step bar (:func:`kelix.quickstart._follow`). The child runs the stage's command line through
:func:`kelix.cli.main`, exactly what ``kelix <argv>`` runs. ``subprocess``: the same command line as a new
``python -m kelix.cli`` process (each pays the ~11 s of imports again). Scoring is forked likewise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import traceback

from kelix.quickstart import _follow, _versions, run_summary

DISTINCT_IMAGES = 200  # held-out dense images of the token probe (400 text patches)
PRELOAD = ("kelix.training.cli", "kelix.tokenizer.module", "kelix.tokenizer.codebook", "kelix.llm.module",
           "kelix.data.datamodule", "kelix.pipeline", "kelix.eval.runner", "kelix.eval.synthetic",
           "kelix.eval.synthetic_dense", "tensorboard.backend.event_processing.event_accumulator")


def _child(fn, *args) -> None:
    """In a forked child: run ``fn(*args)`` and leave with its status (never return into the parent's code)."""
    code = 0
    try:
        rc = fn(*args)
        code = rc if isinstance(rc, int) else 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 (the child reports everything, then exits)
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def forked(fn, args: tuple, log_path: str, bar) -> tuple[int, int | None]:
    """``fn(*args)`` in a forked child, its output into ``log_path``; returns (exit status, last step)."""
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.dup2(w, 1)
        os.dup2(w, 2)
        os.close(w)
        # the streams on the new fds, also when the parent's were replaced (pytest's capture, a notebook)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        _child(fn, *args)
    os.close(w)
    with open(log_path, "w") as log, os.fdopen(r, "rb") as stream:
        log.write(f"$ {' '.join(args[0]) if args and isinstance(args[0], list) else fn.__name__}\n")
        step = _follow(stream, log, bar)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), step


def spawned(argv: list[str], log_path: str, bar) -> tuple[int, int | None]:
    """``python -m kelix.cli <argv>`` as a new process, its output into ``log_path``."""
    with open(log_path, "w") as log:
        log.write(f"$ kelix {' '.join(argv)}\n")
        proc = subprocess.Popen([sys.executable, "-m", "kelix.cli", *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=os.environ.copy())
        try:
            step = _follow(proc.stdout, log, bar)
        finally:
            rc = proc.wait()
    return rc, step


def _kelix(argv: list[str]) -> int | None:
    from kelix.cli import main

    return main(list(argv))


def _fail(what: str, log_path: str, rc: int) -> None:
    with open(log_path, errors="replace") as f:
        tail = [ln for ln in f.read().replace("\r", "\n").splitlines() if ln.strip()][-30:]
    sys.stderr.write("\n".join(tail) + "\n")
    raise SystemExit(f"kelix ablate: {what} failed (exit {rc}); its whole output: {log_path}")


def ensure_benchmarks(root: str, counts: dict[str, int]) -> None:
    """The held-out splits under ``root``; one holding at least the items asked for is reused."""
    from kelix.eval.synthetic import write_benchmark
    from kelix.eval.synthetic_dense import write_dense_benchmark

    for name, n in counts.items():
        path = os.path.join(root, name, "data.jsonl")
        if os.path.isfile(path) and sum(1 for ln in open(path) if ln.strip()) >= n:
            continue
        if name == "synthetic-dense":
            write_dense_benchmark(root, n)
        else:
            write_benchmark(name, root, n)


def score(run, bench_root: str, counts: dict[str, int], eval_dir: str, stages: dict) -> dict:
    """The run's scores: every benchmark through its pipeline (greedy answers) and the LM loss; written
    to ``run.scores`` (atomically: its presence marks the run finished)."""
    import transformers

    from kelix.eval import get_benchmark
    from kelix.eval.runner import PipelineModel
    from kelix.eval.runner import run as run_benchmark
    from kelix.eval.synthetic_dense import token_distinctness
    from kelix.llm.model import KelixLM
    from kelix.pipeline import KelixPipeline
    from kelix.tokenizer.model import KelixTokenizer

    transformers.utils.logging.disable_progress_bar()
    tok = KelixTokenizer.from_pretrained(run.tokenizer)
    model = PipelineModel(KelixPipeline(tok, KelixLM.from_pretrained(run.llm)))
    results, t = {}, time.time()
    probe = token_distinctness(tok, DISTINCT_IMAGES)
    for name, n in counts.items():
        bench = get_benchmark(name)
        out = os.path.join(eval_dir, name)
        shutil.rmtree(out, ignore_errors=True)  # predictions of an earlier model would be resumed
        results[name] = run_benchmark(model, bench, bench.limit(bench.read(bench_root), n), out, bench_root,
                                      batch_size=16, progress=False)
    versions = _versions(run.llm_run)
    lm = run_summary(versions[-1] if versions else None)
    doc = {"row": run.row, "seed": run.seed,
           "general": results["synthetic-vqa"]["overall"]["acc"],
           "text_rich": results["synthetic-dense"]["overall"].get("corpus_char_acc"),
           "ocr": results.get("synthetic-ocr", {}).get("overall", {}).get("corpus_char_acc"),
           "lm_loss": lm.get("losses", {}).get("val/loss"),
           "dense_distinct": probe["distinct"], "dense_tokens": probe["tokens"],
           "per_category": results["synthetic-vqa"].get("per_category", {}),
           "dense_exact": results["synthetic-dense"]["overall"].get("exact"),
           "items": counts, "stages": stages, "eval_seconds": round(time.time() - t, 1),
           "tokenizer": run.tokenizer, "llm": run.llm, "llm_run": versions[-1] if versions else None}
    os.makedirs(os.path.dirname(run.scores), exist_ok=True)
    with open(run.scores + ".tmp", "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(run.scores + ".tmp", run.scores)
    return doc


def summary_line(run, s: dict, seconds: float | None) -> str:
    if seconds is None:
        return f"{run.row:<14} seed {run.seed}: skipped, {run.scores} exists"
    st = ", ".join(f"{k} {v}" for k, v in s["stages"].items())
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    loss = "n/a" if s.get("lm_loss") is None else f"{s['lm_loss']:.3f}"
    return (f"{run.row:<14} seed {run.seed}: general {pct(s['general'])}, text-rich {pct(s['text_rich'])}, "
            f"OCR {pct(s['ocr'])}, LM loss {loss}; {st}, eval {s['eval_seconds']:.0f}s; {seconds:.0f}s")


def run_all(runs, out: str, counts: dict[str, int], mode: str = "fork") -> dict[str, dict[int, dict]]:
    """Train and score every run not yet scored; returns ``{row: {seed: scores}}`` of every run of the plan."""
    import importlib

    from tqdm import tqdm

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models on a small CPU (kelix.quickstart._run)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    tqdm.monitor_interval = 0  # no monitor thread alive across fork
    log_dir, bench_root = os.path.join(out, "logs"), os.path.join(out, "benchmarks")
    os.makedirs(log_dir, exist_ok=True)
    todo = [r for r in runs if not os.path.isfile(r.scores)]
    if todo and mode == "fork":
        for name in PRELOAD:
            importlib.import_module(name)
    if todo:
        ensure_benchmarks(bench_root, counts)
    scores: dict[str, dict[int, dict]] = {}
    for run in runs:
        if os.path.isfile(run.scores):
            with open(run.scores) as f:
                scores.setdefault(run.row, {})[run.seed] = json.load(f)
            print(summary_line(run, scores[run.row][run.seed], None), flush=True)
            continue
        t0, stages = time.time(), {}
        with tqdm(desc=f"{run.row} s{run.seed}", unit="step", dynamic_ncols=True, leave=False) as bar:
            for s in run.stages:
                if s.done():
                    stages[s.kind] = "reused"
                    continue
                bar.reset()  # each stage counts its own steps
                bar.set_postfix_str("", refresh=False)
                bar.set_description(f"{run.row} s{run.seed} {s.kind}")
                log, t = os.path.join(log_dir, f"{s.id}.log"), time.time()
                rc, step = (forked(_kelix, (s.argv,), log, bar) if mode == "fork" else spawned(s.argv, log, bar))
                if rc != 0:
                    _fail(f"stage {s.id}", log, rc)
                if not s.done():
                    raise SystemExit(f"kelix ablate: stage {s.id} finished but wrote no {s.export}  ({log})")
                stages[s.kind] = f"{step} steps {time.time() - t:.0f}s" if step else f"{time.time() - t:.0f}s"
            bar.reset()
            bar.set_postfix_str("", refresh=False)
            bar.set_description(f"{run.row} s{run.seed} eval")
            log = os.path.join(log_dir, f"{run.row}_s{run.seed}_eval.log")
            eval_dir = os.path.join(out, "eval", f"{run.row}_s{run.seed}")
            rc, _ = forked(score, (run, bench_root, counts, eval_dir, stages), log, bar)
            if rc != 0 or not os.path.isfile(run.scores):
                _fail(f"scoring {run.row} seed {run.seed}", log, rc)
        with open(run.scores) as f:
            scores.setdefault(run.row, {})[run.seed] = json.load(f)
        print(summary_line(run, scores[run.row][run.seed], time.time() - t0), flush=True)
    return scores
