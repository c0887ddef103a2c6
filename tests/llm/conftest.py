"""Tiny artifacts shared by the LLM tests: a random Kelix tokenizer and a random Qwen3 backbone, saved
once per session and loaded back through the real paths."""

from __future__ import annotations

import pytest
import torch

DECODER = dict(decoder_width=32, decoder_layers=1, decoder_heads=2, decoder_ffn=64)


@pytest.fixture(scope="session")
def image_tokenizer():
    from kelix.tokenizer.model import KelixTokenizer, tiny_config

    torch.manual_seed(0)
    return KelixTokenizer(tiny_config()).eval()  # N=4, K=32, d=16, out_dim=64


@pytest.fixture(scope="session")
def tok_dir(image_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("image_tokenizer")
    image_tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def plain_lm():
    """The tiny Qwen3 the Kelix LLM is built on (its text rows stay untouched by the extension)."""
    from kelix.hf import TINY_QWEN3, load_causal_lm

    torch.manual_seed(0)
    return load_causal_lm(config=TINY_QWEN3).eval()


@pytest.fixture(scope="session")
def backbone_dir(plain_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("backbone")
    plain_lm.save_pretrained(out)
    return str(out)


@torch.no_grad()
def stand_in_training(lm, seed: int = 0):
    """Weights as after some training, so that every input of the predictor matters and greedy
    answers vary: backbone layers 8x their (tiny, 0.02) init, whose random stream otherwise points
    one way at every position; a block decoder that is not the identity (its zero-initialised output
    projection drawn at random); parallel heads that are not identities; and LM-head
    visual rows as distinct as text rows (they start at the text rows' mean). Returns ``lm``."""
    from kelix.llm.decoder import ParallelHeads

    g = torch.Generator().manual_seed(1000 + seed)
    for p in lm.body.layers.parameters():
        if p.ndim == 2:
            p.mul_(8.0)
    dec = lm.decoder
    if isinstance(dec, ParallelHeads):
        D = dec.text_head.shape[0]
        for p in (dec.text_head, dec.code_heads):
            p.add_(torch.randn(p.shape, generator=g) * 0.5 / D ** 0.5)
    else:  # at the code embeddings' scale, so that h, the previous code and the slot all move the output
        j = torch.arange(lm.vocab.N).repeat(8)
        scale = float(lm.code_embed(j, torch.randint(0, lm.vocab.K, j.shape, generator=g)).std())
        D, W = dec.proj_in.in_features, dec.proj_in.out_features
        dec.proj_in.weight.copy_(torch.randn(dec.proj_in.weight.shape, generator=g) / (D ** 0.5 * scale))
        dec.slot_embed.weight.copy_(torch.randn(dec.slot_embed.weight.shape, generator=g) * 0.3)
        for p in dec.body.parameters():
            if p.ndim == 2:  # unit gain, so attention to h and to earlier codes weighs like the residual
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
        dec.proj_out.weight.copy_(torch.randn(dec.proj_out.weight.shape, generator=g) * scale / W ** 0.5)
    head, vo = lm.lm_head.weight, lm.vocab.visual_offset
    text = head[:vo].float()
    head[vo:] = (text.mean(0) + text.std(0) * torch.randn(head.shape[0] - vo, head.shape[1], generator=g)).to(head.dtype)
    return lm


@pytest.fixture(scope="session")
def make_lm(backbone_dir, tok_dir):
    """Build a KelixLM on the saved tiny backbone (``projector`` mode reads the saved tokenizer); with
    ``untrained`` as built, else with :func:`stand_in_training` weights."""
    from kelix.llm.model import KelixLM, LLMConfig

    def make(seed: int = 0, untrained: bool = False, **overrides):
        torch.manual_seed(seed)
        cfg = dict(backbone=backbone_dir, text_tokenizer="builtin:bytes", image_tokenizer=tok_dir, **DECODER)
        lm = KelixLM(LLMConfig(**{**cfg, **overrides}))
        return lm if untrained else stand_in_training(lm, seed)

    return make


@pytest.fixture(scope="session")
def lm_table(make_lm):
    return make_lm(visual_input="table").eval()


@pytest.fixture(scope="session")
def lm_projector(make_lm):
    return make_lm(visual_input="projector").eval()


@pytest.fixture(scope="session")
def lm_parallel(make_lm):
    """Table 7 exp3's predictor (a text head and N code heads) on the table model."""
    return make_lm(visual_input="table", predictor="parallel").eval()


def random_doc_batch(lm, lengths, seed=0, visual_every=3):
    """Documents of random text ids with a visual block every few positions, as collate_docs input."""
    from kelix.llm.layout import BlockDoc, ImageRef

    g = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        d = BlockDoc()
        toks = torch.randint(0, 250, (n,), generator=g).tolist()
        vis = [i for i in range(1, n) if i % visual_every == 0]
        for i in vis:
            toks[i] = -1
        d.tokens, d.targets = toks, [i > 0 for i in range(n)]
        if vis:
            codes = torch.randint(0, lm.vocab.K, (1, len(vis), lm.vocab.N), generator=g)
            d.images.append(ImageRef(1, len(vis), vis, codes=codes))
        docs.append(d)
    return docs
