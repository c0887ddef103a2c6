"""Embedding unification (paper 4.3.3): fold the tokenizer's and stage 1's up-projectors into the table.

After stage 1 a visual block's input is ``W2 (W1 fuse(v) + b1) + b2``. Unification writes, for each
sub-codebook j and code c, the row ``W2 W1 v_jc s + (W2 b1 + b2) / N`` at id ``visual_offset + j*K + c``
of the LLM's embedding table (``s`` = 1 for sum fusion, 1/N for mean) and drops the projector: the sum
of a block's N rows is exactly the stage-1 input, so the model computes the same function, and from
stage 2.1 on text and image rows are one table trained together.

``kelix unify-embeddings --src <stage-1 LLM dir or .ckpt> --out <dir>``
"""

from __future__ import annotations

import argparse
import logging

import torch

log = logging.getLogger("kelix.llm")


@torch.no_grad()
def unify_embeddings(lm, mode: str = "fold") -> None:
    """Switch ``lm`` from its stage-1 projector to visual rows of its embedding table, in place.

    ``fold`` writes the projector's rows (paper 4.3.3). ``random`` drops the projector and keeps
    the rows drawn when the vocabulary was extended (untouched by stage 1): Table 7 exp2, a
    randomly initialised visual embedding table without alignment.
    """
    if mode not in ("fold", "random"):
        raise ValueError(f"unify mode {mode!r} is not fold or random")
    if lm.visual is None:
        raise ValueError("the model already reads visual ids from its embedding table (nothing to unify)")
    if lm.config.visual_input == "continuous":
        raise ValueError("a continuous-feature model (visual_input: continuous) has no codes to fold into a table")
    v = lm.vocab
    if mode == "fold":
        emb = lm.backbone.get_input_embeddings()
        table = lm.visual.table().to(device=emb.weight.device, dtype=emb.weight.dtype)
        emb.weight[v.visual_offset:v.visual_offset + v.S] = table
    lm.visual = None
    lm.config.visual_input = "table"
    log.info("unified (%s): %d image rows in the embedding table", mode, v.S)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kelix unify-embeddings", description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="stage-1 Kelix LLM directory (export_dir / export-llm) or its .ckpt")
    p.add_argument("--out", required=True, help="output Kelix LLM directory (visual_input: table)")
    p.add_argument("--mode", default="fold", choices=["fold", "random"],
                   help="fold the projector (paper) or keep random visual rows (Table 7 exp2)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written tensors (default: as stored)")
    args = p.parse_args(argv)
    from kelix.llm.export import load_lm

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    lm = load_lm(args.src)
    unify_embeddings(lm, args.mode)
    lm.save_pretrained(args.out, dtype=args.dtype)
    print(f"wrote {args.out}")
    return 0
