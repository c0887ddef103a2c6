"""``kelix export-llm``: a training checkpoint -> a Kelix LLM directory (the next stage's ``init_from``).

The directory holds ``config.json``, ``model.safetensors`` (block decoder, stage-1 projector),
``backbone/`` (transformers format) and the extended text tokenizer. The checkpoint may be a
``.ckpt`` file, a sharded (FSDP2) checkpoint directory or ``kelix convert-checkpoint`` output; runs
with ``export_dir`` set write the directory themselves at the end of fit.

``kelix export-llm --ckpt runs/llm_stage1/version_0/checkpoints/last.ckpt --out exports/llm_stage1``

A LoRA run's checkpoint holds the adapters and the trainable rest only: ``--merge-lora`` rebuilds the model
from its base (the run's ``init_from``, recorded in the checkpoint, or ``--base``), loads them and folds the
adapters into the weights, so the directory is a plain Kelix LLM directory.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("kelix.llm")


def read_llm_checkpoint(path: str) -> tuple[dict, dict | None]:
    """``(weights without the 'lm.' prefix, the 'kelix_llm' metadata or None)`` of a training checkpoint:
    a ``.ckpt`` file, a sharded (FSDP2) checkpoint directory, or ``kelix convert-checkpoint`` output."""
    import json

    from kelix.training.convert import is_sharded_checkpoint, read_checkpoint
    from kelix.training.weights import read_state_dict

    if os.path.isdir(path) and not is_sharded_checkpoint(path):
        cfg_file = os.path.join(path, "config.json")
        meta = None
        if os.path.isfile(cfg_file):
            with open(cfg_file) as f:
                meta = json.load(f).get("kelix_llm")
        sd = read_state_dict(path)
    else:
        sd, info = read_checkpoint(path)
        meta = info.get("kelix_llm")
    if any(k.startswith("lm.") for k in sd):
        sd = {k[3:]: v for k, v in sd.items() if k.startswith("lm.")}
    return sd, meta


def load_lm(path: str, text_tokenizer: str | None = None, merge_lora: bool = False, base: str | None = None):
    """A :class:`~kelix.llm.model.KelixLM` from a Kelix LLM directory or a ``UnifiedLLMModule`` checkpoint
    (``.ckpt``, sharded directory, or ``kelix convert-checkpoint`` output).

    A checkpoint stores the model's config and the backbone's architecture; the text tokenizer is
    re-read from the path recorded at training time unless ``text_tokenizer`` is given. A LoRA checkpoint
    needs ``merge_lora`` (see :func:`merged_lora_lm`).
    """
    from kelix.llm.model import KelixLM
    from kelix.llm.module import is_llm_dir

    if is_llm_dir(path):
        return KelixLM.from_pretrained(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} is neither a Kelix LLM directory nor a checkpoint")
    sd, meta = read_llm_checkpoint(path)
    if meta is None:
        raise ValueError(f"{path}: not a UnifiedLLMModule checkpoint (no 'kelix_llm' metadata)")
    if merge_lora:
        return merged_lora_lm(sd, meta, base, where=path).eval()
    return lm_from_weights(sd, meta, text_tokenizer, where=path).eval()


def merged_lora_lm(sd: dict, meta: dict, base: str | None = None, where: str = "checkpoint"):
    """The model of a LoRA checkpoint (``sd``: adapters and trainable rest; ``meta``: its ``kelix_llm``) with
    its adapters folded into the weights: its base directory (``base``, default the run's ``init_from``)
    loaded in the run's dtype, the adapters injected, ``sd`` loaded (every trainable tensor must be there)."""
    from kelix.llm.model import KelixLM
    from kelix.llm.module import is_llm_dir
    from kelix.lora.adapters import LoRAConfig, merge_lora_
    from kelix.lora.llm import apply_llm_lora

    lora = meta.get("lora")
    if not lora:
        raise ValueError(f"{where}: not a LoRA checkpoint (no lora entry in its kelix_llm metadata): drop --merge-lora")
    base = base or lora.get("base")
    if not base or not is_llm_dir(base):
        raise FileNotFoundError(f"{where}: its base {base!r} is not a Kelix LLM directory: pass --base DIR "
                                "(the directory the LoRA run started from, its init_from)")
    lm = KelixLM.from_pretrained(base, dtype=meta["config"].get("dtype"))
    apply_llm_lora(lm, LoRAConfig(**lora["config"]))
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(trainable - set(sd)), sorted(set(sd) - set(lm.state_dict()))
    if missing or unexpected:
        raise KeyError(f"{where} does not match {base} with its LoRA options: missing {missing[:3]}, "
                       f"unexpected {unexpected[:3]}")
    lm.load_state_dict(sd, strict=False)
    merge_lora_(lm.backbone)
    return lm.requires_grad_(False)


def lm_from_weights(sd: dict, meta: dict, text_tokenizer: str | None = None, where: str = "checkpoint"):
    """Build the model ``meta`` (a checkpoint's ``kelix_llm`` entry) describes and load ``sd`` into it."""
    from kelix.llm.model import KelixLM, LLMConfig, fill_legacy

    if meta.get("lora"):
        raise ValueError(f"{where} holds LoRA adapters and the trainable rest, not a whole model: "
                         "kelix export-llm --ckpt ... --merge-lora --out DIR writes the merged model")
    cfg = dict(meta["config"])
    bb = dict(meta["backbone_config"])
    bb.pop("architectures", None)
    bb.pop("transformers_version", None)
    cfg.update(backbone=None, backbone_config=bb, image_tokenizer=None,
               text_tokenizer=text_tokenizer or cfg.get("text_tokenizer") or cfg.get("backbone"))
    lm = KelixLM(LLMConfig(**cfg))
    missing, unexpected = lm.load_state_dict(fill_legacy(sd), strict=False)
    if missing or unexpected:
        raise KeyError(f"{where}: checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return lm


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kelix export-llm", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True,
                   help="UnifiedLLMModule checkpoint (.ckpt, sharded directory, convert-checkpoint output) or a Kelix LLM directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--text-tokenizer", default=None, help="tokenizer directory, if the one recorded in the checkpoint moved")
    p.add_argument("--merge-lora", action="store_true",
                   help="a LoRA run's checkpoint: fold its adapters into its base and write a plain Kelix LLM directory")
    p.add_argument("--base", default=None,
                   help="with --merge-lora: the base Kelix LLM directory, if it moved since training (default: its init_from)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written tensors (default: as trained)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        lm = load_lm(args.ckpt, args.text_tokenizer, merge_lora=args.merge_lora, base=args.base)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"kelix export-llm: {e}", file=sys.stderr)
        return 2
    lm.save_pretrained(args.out, dtype=args.dtype)
    print(f"wrote {args.out}")
    return 0
