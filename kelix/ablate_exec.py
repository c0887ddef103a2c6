"""Running the plan of :mod:`kelix.ablate`: each stage in its own process, one bar and one line per run.

``fork`` (default): the parent imports the kit once, then forks a child per stage, whose stdout and
stderr go through a pipe to ``<out>/logs/<stage>.log`` while the parent drives the run's bar from the
child's step bar (:func:`kelix.quickstart._follow`). The child runs the stage's command line through
:func:`kelix.cli.main`, exactly what ``kelix <argv>`` runs. ``subprocess``: the same command line as a new
``python -m kelix.cli`` process (each pays the ~11 s of imports again). Scoring is forked likewise.

``jobs > 1``: that many runs at once, one thread of this process each (the threads only fork and wait; the
work is in the children, each on ``cpu_count // jobs`` torch threads). A stage several runs name (same id)
is built by the first run that reaches it; another run reaching it meanwhile waits (:class:`StageBoard`).
The terminal gets one bar (runs done) and each run's summary line when it ends; a failed run is reported
and the others go on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback

from kelix.console.errors import RunFailed
from kelix.quickstart import _follow, _versions, run_summary

DISTINCT_IMAGES = 200  # held-out dense images of the token probe (400 text patches)
PRELOAD = ("kelix.training.cli", "kelix.tokenizer.module", "kelix.tokenizer.codebook", "kelix.llm.module",
           "kelix.data.datamodule", "kelix.pipeline", "kelix.eval.runner", "kelix.eval.synthetic",
           "kelix.eval.synthetic_dense", "tensorboard.backend.event_processing.event_accumulator")
# Held around fork and around the parent's terminal output: a lock another thread holds at the fork stays
# held in the child forever (tqdm's, a stream's), and a pipe made for one child must not leak into another
_FORK = threading.Lock()


def threads_per_child(jobs: int) -> int | None:
    """Torch threads of each stage child: ``cpu_count // jobs``; None (the environment's, today's) at 1 job."""
    return max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(threads)  # and the child's own children (loader workers)
        torch.set_num_threads(threads)


def _child(fn, args: tuple, threads: int | None = None) -> None:
    """In a forked child: run ``fn(*args)`` and leave with its status (never return into the parent's code)."""
    code = 0
    try:
        _set_threads(threads)
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


def forked(fn, args: tuple, log_path: str, bar, threads: int | None = None) -> tuple[int, int | None]:
    """``fn(*args)`` in a forked child, its output into ``log_path``; returns (exit status, last step)."""
    with _FORK:
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
            _child(fn, args, threads)
        os.close(w)
    with open(log_path, "w") as log, os.fdopen(r, "rb") as stream:
        log.write(f"$ {' '.join(args[0]) if args and isinstance(args[0], list) else fn.__name__}\n")
        step = _follow(stream, log, bar)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), step


def spawned(argv: list[str], log_path: str, bar, threads: int | None = None) -> tuple[int, int | None]:
    """``python -m kelix.cli <argv>`` as a new process, its output into ``log_path``."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}  # torch reads it at start
    with open(log_path, "w") as log:
        log.write(f"$ kelix {' '.join(argv)}\n")
        proc = subprocess.Popen([sys.executable, "-m", "kelix.cli", *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env)
        try:
            step = _follow(proc.stdout, log, bar)
        finally:
            rc = proc.wait()
    return rc, step


def _kelix(argv: list[str]) -> int | None:
    from kelix.cli import main

    return main(list(argv))


def _fail(what: str, log_path: str, rc: int) -> None:
    """Raise the failure: the log's last 30 lines, then where the whole log is (one message, so that
    concurrent runs print it in one piece)."""
    with open(log_path, errors="replace") as f:
        tail = [ln for ln in f.read().replace("\r", "\n").splitlines() if ln.strip()][-30:]
    raise RunFailed("\n".join(tail) + f"\nkelix ablate: {what} failed (exit {rc}); its whole output: {log_path}")


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


class StageBoard:
    """Each stage id is built once: the first run to reach it builds it (``build(stage)``, or ``"reused"``
    when its export is on disk already); a run reaching it while it is being built waits for the build to end,
    so it never trains it a second time nor reads a half-written export. Keyed by :attr:`Stage.id`, the name
    :func:`kelix.ablate.plan` gives a stage every run of it shares."""

    def __init__(self, build):
        self._build, self._lock = build, threading.Lock()
        self._ended: dict[str, threading.Event] = {}
        self._failed: set[str] = set()

    def get(self, stage, bar) -> str:
        """What the run's summary says of the stage: its steps and seconds if this run built it, else reused."""
        with self._lock:
            ended = self._ended.get(stage.id)
            mine = ended is None
            if mine:
                ended = self._ended[stage.id] = threading.Event()
        if not mine:
            ended.wait()
            if stage.id in self._failed:
                raise RunFailed(f"kelix ablate: stage {stage.id} failed in another run (its error above)")
            return "reused"
        try:
            return "reused" if stage.done() else self._build(stage, bar)
        except BaseException:
            self._failed.add(stage.id)
            raise
        finally:
            ended.set()


class _Quiet:
    """A bar that shows nothing: a stage's steps while several runs share the terminal."""

    total, n = None, 0

    def reset(self, total=None):
        self.total, self.n = total, 0

    def set_postfix_str(self, *a, **k):
        pass

    set_description = refresh = set_postfix_str


def build_stage(stage, bar, log_dir: str, mode: str, threads: int | None) -> str:
    """Train (or build) one stage in its child; returns its summary ("60 steps 15s")."""
    log, t = os.path.join(log_dir, f"{stage.id}.log"), time.time()
    rc, step = (forked(_kelix, (stage.argv,), log, bar, threads) if mode == "fork"
                else spawned(stage.argv, log, bar, threads))
    if rc != 0:
        _fail(f"stage {stage.id}", log, rc)
    if not stage.done():
        raise RunFailed(f"kelix ablate: stage {stage.id} finished but wrote no {stage.export}  ({log})")
    return f"{step} steps {time.time() - t:.0f}s" if step else f"{time.time() - t:.0f}s"


def run_one(run, board: StageBoard, bar, out: str, counts: dict[str, int], threads: int | None) -> dict:
    """Every stage of ``run`` in order (through ``board``), then its scoring; returns its scores."""
    stages = {}
    for s in run.stages:
        bar.reset()  # each stage counts its own steps
        bar.set_postfix_str("", refresh=False)
        bar.set_description(f"{run.row} s{run.seed} {s.kind}")
        stages[s.kind] = board.get(s, bar)
    bar.reset()
    bar.set_postfix_str("", refresh=False)
    bar.set_description(f"{run.row} s{run.seed} eval")
    log = os.path.join(out, "logs", f"{run.row}_s{run.seed}_eval.log")
    eval_dir = os.path.join(out, "eval", f"{run.row}_s{run.seed}")
    rc, _ = forked(score, (run, os.path.join(out, "benchmarks"), counts, eval_dir, stages), log, bar, threads)
    if rc != 0 or not os.path.isfile(run.scores):
        _fail(f"scoring {run.row} seed {run.seed}", log, rc)
    with open(run.scores) as f:
        return json.load(f)


def run_all(runs, out: str, counts: dict[str, int], mode: str = "fork", jobs: int = 1) -> dict[str, dict[int, dict]]:
    """Train and score every run not yet scored, ``jobs`` runs at once; returns ``{row: {seed: scores}}`` of
    every run of the plan (whatever order they finished in)."""
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
    threads = threads_per_child(jobs)
    board = StageBoard(lambda stage, bar: build_stage(stage, bar, log_dir, mode, threads))
    done: dict[tuple[str, int], dict] = {}
    for run in runs:
        if run not in todo:
            with open(run.scores) as f:
                done[run.row, run.seed] = json.load(f)
            print(summary_line(run, done[run.row, run.seed], None), flush=True)
        elif jobs == 1:  # one run at a time, its bar following each stage's steps
            t0 = time.time()
            with tqdm(desc=f"{run.row} s{run.seed}", unit="step", dynamic_ncols=True, leave=False) as bar:
                done[run.row, run.seed] = run_one(run, board, bar, out, counts, threads)
            print(summary_line(run, done[run.row, run.seed], time.time() - t0), flush=True)
    if jobs > 1 and todo:
        _run_concurrently(todo, jobs, lambda run: run_one(run, board, _Quiet(), out, counts, threads), done)
    scores: dict[str, dict[int, dict]] = {}
    for run in runs:  # the plan's order, not the order the runs ended in
        scores.setdefault(run.row, {})[run.seed] = done[run.row, run.seed]
    return scores


def _run_concurrently(todo, jobs: int, one, done: dict) -> None:
    """``one(run)`` for every run, ``jobs`` at once; a summary line per run as it ends, under one bar."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tqdm import tqdm

    def timed(run):
        t0 = time.time()
        return one(run), time.time() - t0

    failed = []
    with _FORK:
        overall = tqdm(total=len(todo), desc=f"runs ({jobs} at once)", unit="run", dynamic_ncols=True)
    with ThreadPoolExecutor(jobs) as pool:
        futures = {pool.submit(timed, run): run for run in todo}
        try:
            for f in as_completed(futures):
                run = futures[f]
                try:
                    s, seconds = f.result()
                except SystemExit as e:  # the run's failure (log tail and message); the others go on
                    failed.append(run)
                    line, file = str(e.code), sys.stderr
                except Exception as e:  # noqa: BLE001 (a bug in this process, not in a stage: still this run only)
                    failed.append(run)
                    line, file = "".join(traceback.format_exception(e)).rstrip(), sys.stderr
                else:
                    done[run.row, run.seed] = s
                    line, file = summary_line(run, s, seconds), sys.stdout
                with _FORK:
                    overall.write(line, file=file)
                    overall.update()
        except BaseException:  # Ctrl-C: start no further run (the running ones end with their interrupted children)
            pool.shutdown(cancel_futures=True)
            raise
    with _FORK:
        overall.close()
    if failed:
        names = ", ".join(f"{r.row} seed {r.seed}" for r in todo if r in failed)
        raise RunFailed(f"kelix ablate: {len(failed)} of {len(todo)} runs failed ({names}); the "
                        "others are scored and are skipped when the suite runs again")
