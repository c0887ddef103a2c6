"""End-to-end inference (paper Figure 2): understand an image, or generate one from a prompt.

    pipe = KelixPipeline.from_pretrained(tokenizer="out/tokenizer", llm="out/llm", dit="out/dit")
    pipe.understand(Image.open("cat.jpg"), "What is in the picture?")   # -> str
    pipe.generate("a red circle on a white background", size=1024)      # -> PIL image

Understanding: Kelix-Tok turns each image into a code grid, the LLM reads it as visual blocks after
the question and answers with text blocks until ``<|im_end|>``, the tokenizer's eos or
``<|endoftext|>``. Generation: the LLM writes the image's blocks (row markers forced, codes sampled
per slot), and the DiT renders the collected hidden states through the VAE. Each part is an exported HF-style directory; ``save_pretrained``
writes the three side by side with a ``pipeline.json`` that ``from_pretrained(path)`` reads back.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass

import torch
from PIL import Image as PILImage

from kelix.llm.generate import Sampling, generate_image, generate_text, image_inputs, understanding_doc

PIPELINE_FILE = "pipeline.json"


@dataclass
class PipelineConfig:
    """How the parts are used together.

    Args:
        condition_size: side in pixels of the image the LLM generates (as blocks) for the DiT: its grid
            is ``condition_size / (patch_size * merge_size)`` per side (paper: 504 -> 18x18).
        include_markers: condition the DiT on the row-marker positions too (must match its training).
        image_size: default output side of ``generate`` (paper: 1024).
        steps: default DiT sampling steps.
        dit_cfg_scale: default classifier-free guidance of the DiT (1: none).
        condition_include_end: the DiT's condition runs to ``<|vision_end|>`` inclusive (the released
            Kelix-DiT's; one more LLM step) instead of stopping before it (the kit's DiT training).
        dit_sigma_schedule: the DiT sampler's sigmas: ``default`` (the kit's) or ``linspace`` (the
            release's: ``linspace(1, 1/steps, steps)`` shifted by the flow's shift); see
            :mod:`kelix.dit.sampler`.
    """

    condition_size: int = 504
    include_markers: bool = True
    image_size: int = 1024
    steps: int = 20
    dit_cfg_scale: float = 4.5
    condition_include_end: bool = False
    dit_sigma_schedule: str = "default"


class _Progress:
    """Wraps the DiT so each sampling step advances a progress bar."""

    def __init__(self, dit, bar):
        self._dit, self._bar = dit, bar

    def __call__(self, *args, **kwargs):
        out = self._dit(*args, **kwargs)
        self._bar.update(1)
        return out

    def __getattr__(self, name):
        return getattr(self._dit, name)


class KelixPipeline:
    """Kelix-Tok + unified LLM (+ DiT de-tokenizer for generation)."""

    def __init__(self, tokenizer, lm, detokenizer=None, config: PipelineConfig | None = None,
                 paths: dict | None = None):
        self.tokenizer, self.lm, self.detokenizer = tokenizer.eval(), lm.eval(), detokenizer
        self.config = config or PipelineConfig()
        self.paths = paths or {}
        if tokenizer.config.N != lm.vocab.N or tokenizer.config.K != lm.vocab.K:
            raise ValueError(f"tokenizer N={tokenizer.config.N}, K={tokenizer.config.K} does not match the LLM's "
                             f"N={lm.vocab.N}, K={lm.vocab.K}")
        factor = tokenizer.image_config.factor
        if self.config.condition_size % factor:
            raise ValueError(f"condition_size {self.config.condition_size} is not a multiple of patch*merge {factor}")

    @classmethod
    def from_pretrained(cls, path: str | None = None, *, tokenizer: str | None = None, llm: str | None = None,
                        dit: str | bool | None = None, device: str | torch.device = "cpu", dtype: str | None = None,
                        **config) -> KelixPipeline:
        """Load from a pipeline directory (``pipeline.json``), or from the three part directories.

        ``dit=False`` leaves the DiT unloaded (understanding only: faster, and diffusers is not imported)."""
        from kelix.llm.model import KelixLM
        from kelix.tokenizer.model import KelixTokenizer

        saved = {}
        if path is not None:
            file = os.path.join(path, PIPELINE_FILE)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{path!r} has no {PIPELINE_FILE} (write one with KelixPipeline.save_pretrained)")
            with open(file) as f:
                saved = json.load(f)
            tokenizer = tokenizer or os.path.join(path, saved["tokenizer"])
            llm = llm or os.path.join(path, saved["llm"])
            if dit is None and saved.get("dit"):
                dit = os.path.join(path, saved["dit"])
        if tokenizer is None or llm is None:
            raise ValueError("give a pipeline directory, or at least tokenizer= and llm= directories")
        if dit is False:
            dit = None
        for name, p in (("tokenizer", tokenizer), ("llm", llm), ("dit", dit)):
            if p is not None and not os.path.isdir(p):
                raise FileNotFoundError(f"{name} directory {p!r} does not exist")
        cfg = PipelineConfig(**{**saved.get("config", {}), **config})
        torch_dtype = getattr(torch, dtype) if dtype else None
        tok = KelixTokenizer.from_pretrained(tokenizer).to(device)
        lm = KelixLM.from_pretrained(llm).to(device)
        if torch_dtype is not None:
            tok, lm = tok.to(torch_dtype), lm.to(torch_dtype)
        detok = None
        if dit is not None:
            from kelix.dit.export import load_detokenizer

            detok = load_detokenizer(dit, device)
        return cls(tok, lm, detok, cfg, dict(tokenizer=tokenizer, llm=llm, dit=dit))

    def save_pretrained(self, path: str) -> str:
        """Copy the parts' directories under ``path`` and write ``pipeline.json``."""
        os.makedirs(path, exist_ok=True)
        names = {}
        for name in ("tokenizer", "llm", "dit"):
            src = self.paths.get(name)
            if src is None:
                continue
            dst = os.path.join(path, name)
            if os.path.abspath(src) != os.path.abspath(dst):
                shutil.copytree(src, dst, dirs_exist_ok=True)
            names[name] = name
        with open(os.path.join(path, PIPELINE_FILE), "w") as f:
            json.dump({**names, "config": asdict(self.config)}, f, indent=2)
        return path

    # -- understanding
    @torch.no_grad()
    def understand(self, images, question: str, max_new_tokens: int = 128, sampling: Sampling | None = None,
                   progress: bool = False, stop_ids: tuple[int, ...] | None = None) -> str:
        """Answer ``question`` about ``images`` (a PIL image or a list; may be empty for text chat).
        ``stop_ids`` end the answer (default :func:`~kelix.llm.generate.default_stop_ids`)."""
        images = [images] if isinstance(images, PILImage.Image) else list(images or [])
        codes, feats = image_inputs(self.tokenizer, images, self.lm.vocab.N) if images else ([], None)
        doc = understanding_doc(self.lm, question, codes)
        ids = generate_text(self.lm, [doc], max_new_blocks=max_new_tokens, sampling=sampling or Sampling(temperature=0),
                            progress=progress, stop_ids=stop_ids, visual_embeds=[torch.cat(feats)] if feats else None)
        return self.lm.text_tokenizer.decode(ids[0], skip_special_tokens=True).strip()

    # -- generation
    @property
    def grid(self) -> tuple[int, int]:
        side = self.config.condition_size // self.tokenizer.image_config.factor
        return side, side

    @torch.no_grad()
    def generate(self, prompt: str | list[str], size: int | tuple[int, int] | None = None, steps: int | None = None,
                 cfg_scale: float | None = None, sampling: Sampling | None = None, seed: int = 0,
                 progress: bool = False):
        """Image(s) for ``prompt`` (a string gives one PIL image, a list a list of them).

        Args:
            size: output side or ``(H, W)`` (default ``config.image_size``).
            steps: DiT sampling steps; cfg_scale: DiT guidance (defaults from the config).
            sampling: how the LLM draws each slot of the image's blocks (its ``cfg_scale`` guides the LLM).
            seed: seeds both the LLM's sampling (unless ``sampling.seed`` is set) and the DiT's noise.
        """
        if self.detokenizer is None:
            raise ValueError("this pipeline has no DiT: load it with dit=<exported de-tokenizer directory>")
        from tqdm.auto import tqdm

        from kelix.data.images import to_pil

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        s = sampling or Sampling(seed=seed)
        _, states, mask = generate_image(self.lm, prompts, self.grid, s, include_markers=self.config.include_markers,
                                         progress=progress, include_end=self.config.condition_include_end)
        steps = steps or self.config.steps
        cfg = self.config.dit_cfg_scale if cfg_scale is None else cfg_scale
        detok = self.detokenizer
        with tqdm(total=steps, desc="rendering", disable=not progress) as bar:
            from kelix.dit.sampler import generate as render

            dit = _Progress(detok.dit, bar)
            images = render(dit, detok.vae, states.float(), mask, image_size=size or self.config.image_size,
                            steps=steps, cfg_scale=cfg, shift=detok.flow.shift, seed=seed,
                            num_train_timesteps=detok.flow.num_train_timesteps,
                            sigma_schedule=self.config.dit_sigma_schedule)
        pil = [to_pil(x) for x in images]
        return pil[0] if isinstance(prompt, str) else pil
