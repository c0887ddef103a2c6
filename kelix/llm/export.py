"""``kelix export-llm``: a training checkpoint -> a Kelix LLM directory (the next stage's ``init_from``).

The directory holds ``config.json``, ``model.safetensors`` (block decoder, stage-1 projector),
``backbone/`` (transformers format) and the extended text tokenizer. A sharded (FSDP2) checkpoint is
first consolidated with ``kelix convert-checkpoint``; runs with ``export_dir`` set write the
directory themselves at the end of fit.

``kelix export-llm --ckpt runs/llm_stage1/version_0/checkpoints/last.ckpt --out exports/llm_stage1``
"""

from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger("kelix.llm")


def load_lm(path: str, text_tokenizer: str | None = None):
    """A :class:`~kelix.llm.model.KelixLM` from a Kelix LLM directory or a ``UnifiedLLMModule`` ``.ckpt``.

    A checkpoint stores the model's config and the backbone's architecture; the text tokenizer is
    re-read from the path recorded at training time unless ``text_tokenizer`` is given.
    """
    import torch

    from kelix.llm.model import KelixLM, LLMConfig

    if os.path.isdir(path):
        return KelixLM.from_pretrained(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} is neither a Kelix LLM directory nor a checkpoint file")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    meta = ckpt.get("kelix_llm") if isinstance(ckpt, dict) else None
    if meta is None:
        raise ValueError(f"{path}: not a UnifiedLLMModule checkpoint (no 'kelix_llm' entry); "
                         f"a sharded checkpoint needs kelix convert-checkpoint first")
    cfg = dict(meta["config"])
    bb = dict(meta["backbone_config"])
    bb.pop("architectures", None)
    bb.pop("transformers_version", None)
    cfg.update(backbone=None, backbone_config=bb, image_tokenizer=None,
               text_tokenizer=text_tokenizer or cfg.get("text_tokenizer") or cfg.get("backbone"))
    lm = KelixLM(LLMConfig(**cfg))
    sd = {k[3:]: v for k, v in ckpt["state_dict"].items() if k.startswith("lm.")}
    missing, unexpected = lm.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise KeyError(f"{path}: checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return lm.eval()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kelix export-llm", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="UnifiedLLMModule checkpoint (.ckpt) or a Kelix LLM directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--text-tokenizer", default=None, help="tokenizer directory, if the one recorded in the checkpoint moved")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written tensors (default: as trained)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    lm = load_lm(args.ckpt, args.text_tokenizer)
    lm.save_pretrained(args.out, dtype=args.dtype)
    print(f"wrote {args.out}")
    return 0
