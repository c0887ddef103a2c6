"""A tiny Kelix LLM directory (the kit's tiny Qwen3 + the tiny tokenizer's N*K visual rows, stand-in trained
weights) that LoRA runs start from, and batches of random documents with visual blocks."""

from __future__ import annotations

import pytest
import torch

from tests.llm.conftest import DECODER, backbone_dir, image_tokenizer, plain_lm, random_doc_batch, tok_dir  # noqa: F401


@pytest.fixture(scope="session")
def base_dir(backbone_dir, tok_dir, tmp_path_factory):  # noqa: F811
    from kelix.llm.model import KelixLM, LLMConfig
    from tests.llm.conftest import stand_in_training

    torch.manual_seed(0)
    lm = stand_in_training(KelixLM(LLMConfig(backbone=backbone_dir, text_tokenizer="builtin:bytes",
                                             image_tokenizer=tok_dir, visual_input="table", **DECODER)))
    out = tmp_path_factory.mktemp("base_llm")
    lm.save_pretrained(out)
    return str(out)


def doc_batch(lm, seed: int = 0, lengths=(12, 9, 15)):
    from kelix.llm.data import collate_docs

    return collate_docs(random_doc_batch(lm, list(lengths), seed=seed), lm.vocab.N, pack=True, max_blocks=24)
