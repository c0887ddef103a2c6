"""A tiny random pipeline (tokenizer, LLM, DiT) saved as a pipeline directory, as tests/test_pipeline.py builds it."""

import json

import pytest
import torch

from tests.dit.conftest import TINY_SANA


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory):
    from kelix.dit.export import save_vae
    from kelix.dit.model import DiTConfig, KelixDiT
    from kelix.dit.vae import VAEConfig, load_vae
    from kelix.hf import TINY_QWEN3
    from kelix.llm.model import KelixLM, LLMConfig
    from kelix.pipeline import KelixPipeline
    from kelix.tokenizer.model import KelixTokenizer, tiny_config

    root = tmp_path_factory.mktemp("eval-parts")
    torch.manual_seed(0)
    KelixTokenizer(tiny_config()).save_pretrained(root / "tokenizer")
    lm = KelixLM(LLMConfig(backbone_config=TINY_QWEN3, text_tokenizer="builtin:bytes",
                           image_tokenizer=str(root / "tokenizer"), decoder_width=32, decoder_heads=2, decoder_ffn=64))
    with torch.no_grad():  # spread the random weights, so greedy answers differ by question and image
        for p in lm.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    lm.save_pretrained(root / "llm")
    KelixDiT(DiTConfig(cond_dim=TINY_QWEN3["hidden_size"], transformer=dict(TINY_SANA))).save_pretrained(root / "dit")
    save_vae(load_vae(VAEConfig()), str(root / "dit" / "vae"))
    (root / "dit" / "flow.json").write_text(json.dumps({"shift": 3.0}))
    pipe = KelixPipeline.from_pretrained(tokenizer=str(root / "tokenizer"), llm=str(root / "llm"), dit=str(root / "dit"),
                                         condition_size=56, image_size=32, steps=2, dit_cfg_scale=2.0)
    return pipe.save_pretrained(str(root / "pipeline"))


@pytest.fixture(scope="session")
def pipe(pipeline_dir):
    from kelix.pipeline import KelixPipeline

    return KelixPipeline.from_pretrained(pipeline_dir)


@pytest.fixture(scope="session")
def bench_dir(tmp_path_factory):
    from kelix.eval.synthetic import write_benchmark

    root = tmp_path_factory.mktemp("eval-bench")
    for name in ("synthetic-vqa", "synthetic-ocr", "synthetic-t2i"):
        write_benchmark(name, str(root), n=6)
    return str(root)
