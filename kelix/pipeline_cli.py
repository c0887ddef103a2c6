"""``kelix chat`` and ``kelix generate``: the exported pipeline from the command line."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys


def _common(p: argparse.ArgumentParser):
    p.add_argument("--pipeline", help="pipeline directory (pipeline.json + tokenizer/ llm/ dit/)")
    p.add_argument("--tokenizer", help="exported tokenizer directory (instead of --pipeline)")
    p.add_argument("--llm", help="exported LLM directory (instead of --pipeline)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", help="torch device (default: %(default)s)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default: as saved)")
    p.add_argument("--temperature", type=float, default=None, help="LLM sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


def _cuda() -> bool:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


@contextlib.contextmanager
def _without(*modules: str):
    """Make ``modules`` unimportable for a while (not if already imported): ``import timm`` imports
    wandb, when installed, only for timm's own training scripts (1.5 s of a 2-core start measured)."""
    hidden = [m for m in modules if m not in sys.modules]
    sys.modules.update(dict.fromkeys(hidden))
    try:
        yield
    finally:
        for m in hidden:
            if sys.modules.get(m, 0) is None:
                del sys.modules[m]


def _load(a, dit: bool):
    from kelix.pipeline import KelixPipeline

    if not a.pipeline and not (a.tokenizer and a.llm):
        raise SystemExit("kelix: give --pipeline DIR, or --tokenizer DIR and --llm DIR")
    part = getattr(a, "dit", None) if dit else False  # chat: the DiT stays unloaded (diffusers unimported)
    kw = dict(tokenizer=a.tokenizer, llm=a.llm, dit=part, device=a.device, dtype=a.dtype)
    # loaders print progress; stdout carries only the answer
    with contextlib.redirect_stdout(sys.stderr), _without("wandb"):
        return KelixPipeline.from_pretrained(a.pipeline, **kw)


def chat(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kelix chat", description="Answer a question about images.")
    _common(p)
    p.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("question")
    a = p.parse_args(argv)
    from PIL import Image

    from kelix.llm.generate import Sampling

    for path in a.image:
        if not os.path.isfile(path):
            p.error(f"image {path!r} does not exist")
    images = [Image.open(path).convert("RGB") for path in a.image]
    pipe = _load(a, dit=False)
    s = Sampling(temperature=a.temperature or 0.0, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    print(pipe.understand(images, a.question, max_new_tokens=a.max_new_tokens, sampling=s, progress=True))
    return 0


def generate(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kelix generate", description="Generate an image from a prompt.")
    _common(p)
    p.add_argument("--dit", help="exported DiT directory (instead of --pipeline)")
    p.add_argument("--out", default="generated.png", help="output image file (default: %(default)s)")
    p.add_argument("--size", type=int, help="output side in pixels (default: the pipeline's)")
    p.add_argument("--steps", type=int, help="DiT sampling steps (default: the pipeline's)")
    p.add_argument("--cfg-scale", type=float, help="DiT classifier-free guidance (default: the pipeline's)")
    p.add_argument("--llm-cfg-scale", type=float, default=1.0, help="LLM guidance of image blocks (1: off)")
    p.add_argument("prompt")
    a = p.parse_args(argv)
    from kelix.llm.generate import Sampling

    pipe = _load(a, dit=True)
    t = 1.0 if a.temperature is None else a.temperature
    s = Sampling(temperature=t, top_k=a.top_k, top_p=a.top_p, cfg_scale=a.llm_cfg_scale, seed=a.seed)
    image = pipe.generate(a.prompt, size=a.size, steps=a.steps, cfg_scale=a.cfg_scale, sampling=s, seed=a.seed,
                          progress=True)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    image.save(a.out)
    print(f"wrote {a.out} ({image.width}x{image.height})")
    return 0


if __name__ == "__main__":
    sys.exit(generate())
