"""``kelix quickstart``: the whole Kelix pipeline on tiny models and synthetic data, on CPU, then its scorecard.

Every stage is an ordinary ``kelix fit`` of a recipe in ``recipes/quickstart/`` (run in its own
process, exactly as a user would), each starting from the previous stage's export:

0. ``kelix build-codebook`` on ``tokenizer.yaml``, when it names a ``tokenizer.codebook`` (k-means init)
1. Kelix-Tok (``tokenizer.yaml``) -> ``runs/tokenizer/export``
2. LLM stage 1, alignment (``llm.yaml``) -> ``runs/llm/export``
3. LLM stage 2.2, multi-task with text-to-image (``llm_stage2_2.yaml``) -> ``runs/llm_stage2_2/export``
4. DiT conditioned on that LLM (``dit.yaml`` + the ``dit_on_llm.yaml`` overlay) -> ``runs/dit_llm/export``

The terminal shows one progress bar and one summary line per stage (steps, seconds, final losses,
samples read and skipped, from the run's TensorBoard log); each stage's full output goes to
``<out>/logs/<stage>.log``. Then the exports are assembled into a pipeline (``<out>/pipeline``), scored
on the held-out synthetic benchmarks, each score beside chance and a regression guard (:mod:`kelix.quickstart_score`:
``<out>/scores.json``, ``runs/quickstart``), and the first held-out question and prompt are shown with
their truth. Synthetic shards are made on the way (``data/synthetic``).

    kelix quickstart                       # train, score, demo
    kelix quickstart --eval-only           # score the existing exports (or --pipeline DIR) again
    kelix quickstart --max-steps 3 --eval-items 8 --require-bars   # exit 1 when a guard is missed
"""

from __future__ import annotations

import argparse
import codecs
import os
import re
import shlex
import subprocess
import sys
import time

from kelix.console.errors import RunFailed

STAGES = [  # (run name, recipe files, export directory)
    ("tokenizer", ["tokenizer.yaml"], "runs/tokenizer/export"),
    ("llm", ["llm.yaml"], "runs/llm/export"),
    ("llm_stage2_2", ["llm_stage2_2.yaml"], "runs/llm_stage2_2/export"),
    ("dit_llm", ["dit.yaml", "dit_on_llm.yaml"], "runs/dit_llm/export"),
]
# DiT sampling of the assembled pipeline; its sizes come from the recipes (pipeline_config)
PIPELINE_CONFIG = dict(steps=10, dit_cfg_scale=2.0)
SCORE_LOGDIR = os.path.join("runs", "quickstart")
_STEPS = re.compile(r"Steps:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")  # kelix.training.progress.StepProgressBar
_LOSSES = re.compile(r"\b((?:train|val)_loss)=([-+0-9.e]+|nan)")


def find_recipes(explicit: str | None) -> str:
    """The quickstart recipes: ``--recipes``, ``./recipes/quickstart``, or the source checkout's."""
    if explicit:  # the user's own directory, or an error: never another one in its place
        if not os.path.isfile(os.path.join(explicit, "tokenizer.yaml")):
            raise SystemExit(f"kelix quickstart: --recipes {explicit!r} holds no tokenizer.yaml (give the "
                             "recipes/quickstart directory of a kelix checkout, or a copy of it)")
        return explicit
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for cand in (os.path.join("recipes", "quickstart"), os.path.join(here, "recipes", "quickstart")):
        if os.path.isfile(os.path.join(cand, "tokenizer.yaml")):
            return cand
    raise SystemExit("kelix quickstart: recipes/quickstart not found; run it from the kelix checkout or pass --recipes")


def _recipe_value(recipe_dir: str, files: list[str], keys: tuple[str, ...]):
    import yaml

    value = None
    for name in files:  # an overlay's value wins
        node = yaml.safe_load(open(os.path.join(recipe_dir, name))) or {}
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        value = node if node is not None else value
    return value


def pipeline_config(recipe_dir: str) -> dict:
    """The pipeline's sizes as the recipes train them: ``condition_size`` is the LLM stage 2.2 generation
    size (``gen_image.fixed_size``), ``image_size`` the DiT's ``target_size``."""
    proc = ("data", "init_args", "processor", "init_args")
    llm, dit = STAGES[2][1], STAGES[3][1]
    sizes = {"condition_size": _recipe_value(recipe_dir, llm, (*proc, "gen_image", "fixed_size")),
             "image_size": _recipe_value(recipe_dir, dit, (*proc, "target_size"))}
    for k, v in sizes.items():
        if not isinstance(v, int):
            raise SystemExit(f"kelix quickstart: {recipe_dir}: no {k} found in {llm if k[0] == 'c' else dit} "
                             f"(expected an int, got {v!r})")
    return {**sizes, **PIPELINE_CONFIG}


def usable_cpus() -> int:
    """Cores this process may run on (a container's share, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _option(args: list[str], key: str):
    """The last value ``args`` give ``key`` (``--key value`` or ``--key=value``), else None."""
    value = None
    for i, arg in enumerate(args):
        if arg == key and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(key + "="):
            value = arg.split("=", 1)[1]
    return value


def fit_devices(recipe_dir: str, recipes: list[str], overrides: list[str] = (), cpus: int | None = None) -> list[str]:
    """Overrides that fit a recipe's processes to this machine. A CPU recipe that trains on ``devices: 2``
    processes (two 1-thread processes train ~1.3x the samples per second of one on 2 cores) runs as one
    process with ``accumulate_grad_batches: 2`` on a 1-core machine, or on one GPU when the user's options
    (``-- --trainer.accelerator gpu``) move it there: the same batch per optimizer step, so the same run.
    The user's own ``--trainer.devices`` still wins (it comes later on the command line)."""
    devices = _recipe_value(recipe_dir, recipes, ("trainer", "devices"))
    accumulate = _recipe_value(recipe_dir, recipes, ("trainer", "accumulate_grad_batches")) or 1
    accelerator = _option(list(overrides), "--trainer.accelerator") or \
        _recipe_value(recipe_dir, recipes, ("trainer", "accelerator"))
    slots = (usable_cpus() if cpus is None else cpus) if accelerator == "cpu" else 1
    if not isinstance(devices, int) or devices <= slots:
        return []
    fit = max(n for n in range(1, slots + 1) if devices % n == 0)
    return ["--trainer.devices", str(fit), "--trainer.accumulate_grad_batches", str(accumulate * devices // fit)]


def fit_command(name: str, recipes: list[str], export: str, recipe_dir: str, max_steps: int | None,
                overrides: list[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "kelix.cli", "fit"]
    for r in recipes:
        cmd += ["--config", os.path.join(recipe_dir, r)]
    cmd += ["--name", name, "--model.init_args.export_dir", export, *fit_devices(recipe_dir, recipes, overrides)]
    if max_steps is not None:
        cmd += ["--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", str(max_steps),
                "--trainer.log_every_n_steps", "1"]
    return cmd + list(overrides)


def _versions(name: str) -> list[str]:
    root = os.path.join("runs", name)
    found = [d for d in os.listdir(root) if d.startswith("version_")] if os.path.isdir(root) else []
    return [os.path.join(root, d) for d in sorted(found, key=lambda d: int(d.split("_")[1]) if d[8:].isdigit() else -1)]


def _follow(stream, log, bar) -> int | None:
    """Copy the child's output to ``log``; drive ``bar`` from its step bar. Returns the last step seen."""
    decoder, pending, step = codecs.getincrementaldecoder("utf-8")("replace"), "", None
    while chunk := stream.read1(65536):
        text = decoder.decode(chunk)
        log.write(text)
        *pieces, pending = re.split(r"[\r\n]", pending + text)
        for piece in pieces:
            m = _STEPS.search(piece)
            if m:
                step, total = int(m.group(1)), int(m.group(2))
                if bar.total != total:
                    bar.reset(total=total)
                bar.n = step
                losses = dict(_LOSSES.findall(piece))
                bar.set_postfix_str(", ".join(f"{k}={v}" for k, v in losses.items()), refresh=False)
                bar.refresh()
    return step


def _run(name: str, cmd: list[str], log_dir: str) -> tuple[float, int | None, str]:
    """Run ``cmd``; its output goes to ``log_dir/<name>.log``, the terminal gets one bar.
    Returns (seconds, last step of a fit's step bar, log path)."""
    from tqdm import tqdm

    path = os.path.join(log_dir, f"{name}.log")
    # Tiny models on a small CPU: one intra-op thread avoids thread contention (3-6x faster measured
    # on 2 shared cores); a user's own OMP_NUM_THREADS wins. The log needs no weight-loading bars.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    t = time.time()
    with open(path, "w") as log, tqdm(desc=f"{name:<13}", unit="step", dynamic_ncols=True,
                                      postfix="starting (data, model)") as bar:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        try:
            step = _follow(proc.stdout, log, bar)
        finally:
            rc = proc.wait()
    if rc != 0:
        with open(path, errors="replace") as f:
            tail = [line for line in f.read().replace("\r", "\n").splitlines() if line.strip()][-30:]
        sys.stderr.write("\n".join(tail) + "\n")
        raise RunFailed(f"kelix quickstart: stage {name} failed (exit {rc}); its whole output: {path}")
    return time.time() - t, step, path


def run_stage(name: str, cmd: list[str], export: str, log_dir: str) -> dict:
    """One ``kelix fit``: its summary (:func:`run_summary` of the run it wrote, seconds, log)."""
    before = set(_versions(name))
    seconds, step, path = _run(name, cmd, log_dir)
    if not os.path.isfile(os.path.join(export, "config.json")):
        raise RunFailed(f"kelix quickstart: stage {name} finished but wrote no export in {export}")
    new = [v for v in _versions(name) if v not in before]
    return {"status": "trained", "seconds": round(seconds, 1), "log": path, **run_summary(new[-1] if new else None),
            **({"steps": step} if step is not None else {})}


CODEBOOK_IMAGES = 384  # ~11,500 merged features: 45 per centroid at S = 256, above faiss's 39 (tokenizer.yaml's header)


def codebook_path(recipe_dir: str) -> str | None:
    """The k-means codebook the tokenizer recipe starts from (``tokenizer.codebook``), if it names one."""
    return _recipe_value(recipe_dir, STAGES[0][1], ("model", "init_args", "tokenizer", "codebook"))


def build_codebook(recipe_dir: str, path: str, log_dir: str) -> dict:
    """``kelix build-codebook`` on the tokenizer recipe (its shards, its tokenizer, its output path)."""
    # --feature input: clusters of the quantizer's own input, as tokenizer.yaml's codebook comment says (its
    # encoder and merger are random and frozen, so patch or merged features would land elsewhere)
    cmd = [sys.executable, "-m", "kelix.cli", "build-codebook", "--config", os.path.join(recipe_dir, STAGES[0][1][0]),
           "--feature", "input", "--max-images", str(CODEBOOK_IMAGES)]
    seconds, _, log = _run("codebook", cmd, log_dir)
    if not os.path.isfile(path):
        raise RunFailed(f"kelix quickstart: kelix build-codebook finished but wrote no {path}")
    return {"status": "built", "seconds": round(seconds, 1), "log": log, "export": path}


def run_summary(version: str | None) -> dict:
    """Final train/val losses, samples read and skipped per reason, from a run's TensorBoard log."""
    if version is None:
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(version, size_guidance={"scalars": 0})
    acc.Reload()
    last = {t: acc.Scalars(t)[-1] for t in acc.Tags()["scalars"]}
    out = {"run": version, "losses": {t: last[t].value for t in ("train/loss", "val/loss") if t in last}}
    if "train/loss" in last:
        out["steps"] = last["train/loss"].step + 1
    if "data/samples" in last:
        out["samples"] = int(last["data/samples"].value)
        out["skipped"] = {t.split("/", 2)[2]: int(s.value) for t, s in last.items()
                          if t.startswith("data/skipped/") and s.value}
    return out


def summary_line(name: str, s: dict) -> str:
    if s["status"] == "skipped":
        return f"{name:<13} skipped: {s['export']} exists"
    if s["status"] == "built":
        return f"{name:<13} built in {s['seconds']:.0f} s: {s['export']}  ({s['log']})"
    parts = [f"{name:<13} {s.get('steps', '?')} steps in {s['seconds']:.0f} s"]
    parts += [f"{k} {v:.3f}" for k, v in s.get("losses", {}).items()]
    if "samples" in s:
        skipped = ", ".join(f"{k} {v}" for k, v in s["skipped"].items()) or "none"
        parts.append(f"{s['samples']} samples, skipped: {skipped}")
    return "; ".join(parts) + f"  ({s['log']})"


def assemble(out: str, recipe_dir: str) -> str:
    """``<out>/pipeline`` from the three exports, sized as the recipes trained them."""
    import transformers

    from kelix.pipeline import KelixPipeline

    for name, _, export in STAGES[:1] + STAGES[2:]:
        if not os.path.isfile(os.path.join(export, "config.json")):
            raise SystemExit(f"kelix quickstart: {export}/config.json missing (stage {name}); train it first "
                             "(kelix quickstart without --eval-only) or pass --pipeline")
    transformers.utils.logging.disable_progress_bar()
    pipe = KelixPipeline.from_pretrained(tokenizer=STAGES[0][2], llm=STAGES[2][2], dit=STAGES[3][2],
                                         **pipeline_config(recipe_dir))
    return pipe.save_pretrained(os.path.join(out, "pipeline"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kelix quickstart", description=__doc__.split("\n\n")[0].replace("``", ""),
                                epilog=__doc__.split("\n\n")[-1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", help="directory of the quickstart recipes (default: recipes/quickstart)")
    p.add_argument("--out", default="outputs/quickstart", help="pipeline, scores and demo outputs (default: %(default)s)")
    p.add_argument("--max-steps", type=int, help="override every stage's max_steps (e.g. 3 for a smoke run)")
    p.add_argument("--skip-existing", action="store_true", help="skip stages whose export already exists")
    p.add_argument("--eval-only", action="store_true", help="train nothing: score the existing exports")
    p.add_argument("--pipeline", help="with --eval-only: score this pipeline directory instead of the exports")
    p.add_argument("--eval-items", help="held-out items per benchmark: N, or vqa=N,ocr=N,t2i=N "
                   "(default: vqa=120,ocr=120,t2i=60)")
    p.add_argument("--benchmarks-dir", help="where the held-out benchmarks are written, or reused when they "
                   "already hold enough items (default: <out>/benchmarks)")
    p.add_argument("--gen-temperature", type=float, help="LLM sampling temperature of generated images (default 1)")
    p.add_argument("--gen-top-k", type=int, help="LLM top-k of generated images (default 8)")
    p.add_argument("--require-bars", action="store_true", help="exit 1 when any scorecard guard is missed (for CI)")
    p.add_argument("overrides", nargs=argparse.REMAINDER,
                   help="after --: options for every stage's kelix fit, e.g. -- --trainer.accelerator gpu")
    return p


def main(argv: list[str] | None = None) -> int:
    from kelix import quickstart_score as qs

    a = _parser().parse_args(argv)
    overrides = a.overrides[1:] if a.overrides[:1] == ["--"] else a.overrides
    if a.pipeline and not a.eval_only:
        raise SystemExit("kelix quickstart: --pipeline scores an existing pipeline; give it with --eval-only")
    if a.pipeline and not os.path.isfile(os.path.join(a.pipeline, "pipeline.json")):  # before any benchmark is written
        raise SystemExit(f"kelix quickstart: --pipeline {a.pipeline!r} has no pipeline.json (give the pipeline "
                         "directory a quickstart wrote, e.g. outputs/quickstart/pipeline)")
    counts = qs.parse_items(a.eval_items)
    start = time.time()
    recipe_dir = None if a.pipeline else find_recipes(a.recipes)
    log_dir = os.path.join(a.out, "logs")
    os.makedirs(log_dir, exist_ok=True)
    stages = {}
    if not a.eval_only:
        codebook = codebook_path(recipe_dir)
        if codebook:  # the tokenizer's k-means init (paper 4.2.1), before the tokenizer trains from it
            stages["codebook"] = {"status": "skipped", "export": codebook} if a.skip_existing and \
                os.path.isfile(codebook) else build_codebook(recipe_dir, codebook, log_dir)
            print(summary_line("codebook", stages["codebook"]), flush=True)
        for name, recipes, export in STAGES:
            if a.skip_existing and os.path.isfile(os.path.join(export, "config.json")):
                stages[name] = {"status": "skipped", "export": export}
            else:
                stages[name] = run_stage(name, fit_command(name, recipes, export, recipe_dir, a.max_steps, overrides),
                                         export, log_dir)
            print(summary_line(name, stages[name]), flush=True)
    pipeline = a.pipeline or assemble(a.out, recipe_dir)
    bench_root = a.benchmarks_dir or os.path.join(a.out, "benchmarks")
    print(f"scoring {pipeline} on the held-out benchmarks in {bench_root} "
          f"({', '.join(f'{n} {c}' for n, c in counts.items())} items)", flush=True)
    qs.ensure_benchmarks(bench_root, counts)
    gen = {k: v for k, v in (("temperature", a.gen_temperature), ("top_k", a.gen_top_k)) if v is not None}
    t = time.time()
    results = qs.evaluate(qs.load_model(pipeline, gen), bench_root, counts, os.path.join(a.out, "eval"))
    card, demo = qs.scorecard(results), qs.demo(os.path.join(a.out, "eval"), bench_root, a.out)
    seconds = {"stages": {k: s["seconds"] for k, s in stages.items() if "seconds" in s},
               "eval": round(time.time() - t, 1), "total": round(time.time() - start, 1),
               "eval_per_benchmark": {k: r["seconds"] for k, r in results.items()}}
    print("\n" + qs.format_scorecard(card, counts) + "\n\n" + qs.format_demo(demo))
    tb = qs.write_tensorboard(SCORE_LOGDIR, card, results, {**seconds["stages"], "eval": seconds["eval"],
                                                            "total": seconds["total"]})
    qs.write_scores(os.path.join(a.out, "scores.json"), card, results, counts, stages, seconds, demo)
    print(f"\ntimes: {', '.join(f'{k} {v:.0f}s' for k, v in seconds['stages'].items())}"
          f"{', ' if seconds['stages'] else ''}eval {seconds['eval']:.0f}s; total {seconds['total']:.0f}s\n"
          f"scores: {os.path.join(a.out, 'scores.json')}; TensorBoard: tensorboard --logdir runs "
          f"(scorecard in {tb}, stages in runs/{{{','.join(s[0] for s in STAGES)}}}/version_N)\n"
          f"pipeline: {pipeline}   try: kelix chat --pipeline {pipeline} --image {demo['question_image']} "
          f"{shlex.quote(demo['question'])}")
    status = qs.exit_status(card, a.require_bars)
    if status:
        print("kelix quickstart: --require-bars: " + ", ".join(k for k, r in card.items() if not r["pass"])
              + " below the guard", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
