"""``kelix quickstart``: the whole Kelix pipeline on tiny models and synthetic data, on CPU.

Every stage is an ordinary ``kelix fit`` of a recipe in ``recipes/quickstart/`` (run in its own
process, exactly as a user would), each starting from the previous stage's export:

1. Kelix-Tok (``tokenizer.yaml``) -> ``runs/tokenizer/export``
2. LLM stage 1, alignment (``llm.yaml``) -> ``runs/llm/export``
3. LLM stage 2.2, multi-task with text-to-image (``llm_stage2_2.yaml``) -> ``runs/llm_stage2_2/export``
4. DiT conditioned on that LLM (``dit.yaml`` + the ``dit_on_llm.yaml`` overlay) -> ``runs/dit_llm/export``

Then the three exports are assembled into a pipeline (``outputs/quickstart/pipeline``), which answers
a question about a synthetic image and writes a generated image. Synthetic shards are made on the way
(``data/synthetic``). With tiny random-initialised models and minutes of CPU training the answers and
images are rough: this proves the plumbing, not the quality.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

STAGES = [  # (run name, recipe files, export directory)
    ("tokenizer", ["tokenizer.yaml"], "runs/tokenizer/export"),
    ("llm", ["llm.yaml"], "runs/llm/export"),
    ("llm_stage2_2", ["llm_stage2_2.yaml"], "runs/llm_stage2_2/export"),
    ("dit_llm", ["dit.yaml", "dit_on_llm.yaml"], "runs/dit_llm/export"),
]
CONDITION_SIZE = 84  # the LLM stage 2.2 recipe's generation size: 3x3 visual blocks
IMAGE_SIZE = 32  # the DiT quickstart's target size (recipes/quickstart/dit.yaml)


def find_recipes(explicit: str | None) -> str:
    """The quickstart recipes: ``--recipes``, ``./recipes/quickstart``, or the source checkout's."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for cand in (explicit, os.path.join("recipes", "quickstart"), os.path.join(here, "recipes", "quickstart")):
        if cand and os.path.isfile(os.path.join(cand, "tokenizer.yaml")):
            return cand
    raise SystemExit("kelix quickstart: recipes/quickstart not found; run it from the kelix checkout or pass --recipes")


def run_stage(name: str, recipes: list[str], export: str, recipe_dir: str, max_steps: int | None, log,
              overrides: list[str] = ()) -> float:
    cmd = [sys.executable, "-m", "kelix.cli", "fit"]
    for r in recipes:
        cmd += ["--config", os.path.join(recipe_dir, r)]
    cmd += ["--name", name, "--model.init_args.export_dir", export]
    if max_steps is not None:
        cmd += ["--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", str(max_steps),
                "--trainer.log_every_n_steps", "1"]
    cmd += list(overrides)
    log(f"\n== [{name}] {' '.join(cmd[2:])}")
    t = time.time()
    # Tiny models on a small CPU: one intra-op thread avoids thread contention (3-6x faster measured
    # on 2 shared cores); a user's own OMP_NUM_THREADS wins.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(cmd, check=True, env=env)
    if not os.path.isfile(os.path.join(export, "config.json")):
        raise SystemExit(f"kelix quickstart: stage {name} finished but wrote no export in {export}")
    return time.time() - t


def demo(out_dir: str, log) -> dict:
    """Assemble the pipeline, answer a question about a synthetic image, generate an image."""
    import random

    import torch

    from kelix.data.synthetic import make_sample
    from kelix.llm.generate import Sampling
    from kelix.pipeline import KelixPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = KelixPipeline.from_pretrained(tokenizer=STAGES[0][2], llm=STAGES[2][2], dit=STAGES[3][2], device=device,
                                         condition_size=CONDITION_SIZE, image_size=IMAGE_SIZE, steps=10,
                                         dit_cfg_scale=2.0)
    pipe.save_pretrained(os.path.join(out_dir, "pipeline"))
    meta, images = make_sample("vqa", random.Random(1234), (64, 160))
    question, truth = meta["messages"][0]["content"][1]["text"], meta["messages"][1]["content"]
    images[0].save(os.path.join(out_dir, "question.png"))
    answer = pipe.understand(images[0], question, max_new_tokens=16)
    prompt = "Generate an image of a red circle on a white background."
    image = pipe.generate(prompt, seed=0, sampling=Sampling(temperature=1.0, top_k=8, seed=0))
    image.save(os.path.join(out_dir, "generated.png"))
    log(f"\nQ: {question}\nA (model): {answer!r}   (truth: {truth!r})\nprompt: {prompt}\n"
        f"image: {os.path.join(out_dir, 'generated.png')}")
    return {"question": question, "answer": answer, "truth": truth}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kelix quickstart", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", help="directory of the quickstart recipes (default: recipes/quickstart)")
    p.add_argument("--out", default="outputs/quickstart", help="pipeline and demo outputs (default: %(default)s)")
    p.add_argument("--max-steps", type=int, help="override every stage's max_steps (e.g. 5 for a smoke run)")
    p.add_argument("--skip-existing", action="store_true", help="skip stages whose export already exists")
    p.add_argument("overrides", nargs=argparse.REMAINDER,
                   help="after --: options for every stage's kelix fit, e.g. -- --trainer.accelerator gpu")
    a = p.parse_args(argv)
    overrides = a.overrides[1:] if a.overrides[:1] == ["--"] else a.overrides
    recipe_dir = find_recipes(a.recipes)
    os.makedirs(a.out, exist_ok=True)
    log = print
    times = {}
    start = time.time()
    for name, recipes, export in STAGES:
        if a.skip_existing and os.path.isfile(os.path.join(export, "config.json")):
            log(f"== [{name}] export exists, skipped: {export}")
            continue
        times[name] = run_stage(name, recipes, export, recipe_dir, a.max_steps, log, overrides)
    demo(a.out, log)
    log("\nstage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items())
        + f"; total {time.time() - start:.0f}s")
    log(f"TensorBoard logs: tensorboard --logdir runs   (runs/{{{','.join(s[0] for s in STAGES)}}}/version_N)")
    log(f"exports: {', '.join(s[2] for s in STAGES)}\npipeline: {os.path.join(a.out, 'pipeline')} "
        f"(kelix chat --pipeline {os.path.join(a.out, 'pipeline')} --image {os.path.join(a.out, 'question.png')} "
        f"\"What color is the circle?\")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
